/* One decoding query's attention against a float32 KV cache (engine/model.py `Attention`).
 *
 * Included at the end of int4_gemv.c, so that it shares the thread pool (run_parallel), the
 * AVX2 detection (INT4_SIMD) and the error codes; not compiled on its own.
 *
 * Why: at decode time each layer asks for H queries against L cached positions. SDPA's CPU
 * kernel is built for blocks of queries, and two matmuls and a softmax cost 3 dispatches and a
 * round trip of the scores through memory. Here the G = H / KVH queries of a KV head are one
 * task each on its cache: 8 key rows a step with one reduction for their 8 dot products, e^x 8
 * at a time, 64 output columns held in registers over all value rows.
 *
 * Layout (B = 1), row-major:
 *   q    [H, D]                 the queries, contiguous
 *   k, v [KVH, >= L, D]         the cache, head h at k + h * head_stride (its first L rows used)
 *   out  [H, D]                 softmax(q k^T * scale) v, per head
 * Query head j uses KV head j / G (GQA, as SDPA's enable_gqa). Scores and sums in float32, the
 * softmax with its maximum subtracted: within ~1e-6 relative of SDPA, not its bits.
 */

typedef struct {
    const float *q, *k, *v;
    float *out;
    int64_t G, L, D, head_stride;
    float scale;
    float *scores; /* [KVH][G][L] */
    atomic_long next;
    int64_t KVH;
} attn_job_t;

#ifdef INT4_SIMD
/* e^x for x <= 0 (scores less their maximum), 8 at a time: Cephes' expf polynomial, ~1 ulp. */
static inline __m256 attn_exp(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f)); /* below: ~1e-38, as 0 in the sums */
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The 8 sums of a[0..7]'s lanes, as one vector (lane i: the sum of a[i]). */
static inline __m256 attn_hsum8(const __m256 *a) {
    __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

static inline float attn_dot(const float *a, const float *b, int64_t D) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

/* scores [L] = q . k[l] * scale for one query, then e^(score - max) in place; returns their sum. */
static float attn_scores(const float *q, const float *k, int64_t L, int64_t D, float scale, float *scores) {
    int64_t l = 0;
#ifdef INT4_SIMD
    if (D % 8 == 0) {
        for (; l + 8 <= L; l += 8) { /* 8 positions at once: one reduction for 8 dot products */
            __m256 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qd = _mm256_loadu_ps(q + d);
                for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + (l + r) * D + d), acc[r]);
            }
            _mm256_storeu_ps(scores + l, _mm256_mul_ps(attn_hsum8(acc), _mm256_set1_ps(scale)));
        }
    }
#endif
    for (; l < L; l++) scores[l] = attn_dot(q, k + l * D, D) * scale;
    float top = scores[0], sum = 0.0f;
    for (l = 1; l < L; l++) top = scores[l] > top ? scores[l] : top;
    l = 0;
#ifdef INT4_SIMD
    __m256 total = _mm256_setzero_ps();
    for (; l + 8 <= L; l += 8) {
        __m256 e = attn_exp(_mm256_sub_ps(_mm256_loadu_ps(scores + l), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + l, e);
        total = _mm256_add_ps(total, e);
    }
    sum = hsum256(total);
#endif
    for (; l < L; l++) sum += (scores[l] = expf(scores[l] - top));
    return sum;
}

/* out [D] = sum over l of p[l] v[l] / sum. */
static void attn_values(const float *p, const float *v, int64_t L, int64_t D, float inv_sum, float *out) {
    int64_t d0 = 0;
#ifdef INT4_SIMD
    for (; d0 + 64 <= D; d0 += 64) { /* 64 columns in 8 registers over all positions */
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const __m256 pl = _mm256_set1_ps(p[l]);
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(pl, _mm256_loadu_ps(v + l * D + d0 + 8 * j), acc[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + d0 + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv_sum)));
    }
    for (; d0 + 8 <= D; d0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[l]), _mm256_loadu_ps(v + l * D + d0), acc);
        _mm256_storeu_ps(out + d0, _mm256_mul_ps(acc, _mm256_set1_ps(inv_sum)));
    }
#endif
    for (; d0 < D; d0++) {
        float acc = 0.0f;
        for (int64_t l = 0; l < L; l++) acc += p[l] * v[l * D + d0];
        out[d0] = acc * inv_sum;
    }
}

/* The G queries of KV head h. */
static void attn_head(const attn_job_t *J, int64_t h) {
    const int64_t G = J->G, L = J->L, D = J->D;
    const float *k = J->k + h * J->head_stride, *v = J->v + h * J->head_stride;
    for (int64_t g = 0; g < G; g++) {
        const int64_t head = h * G + g;
        float *scores = J->scores + head * L;
        float sum = attn_scores(J->q + head * D, k, L, D, J->scale, scores);
        attn_values(scores, v, L, D, 1.0f / sum, J->out + head * D);
    }
}

static void attn_run_range(void *arg, int index, int count) {
    attn_job_t *J = (attn_job_t *)arg;
    (void)index;
    (void)count;
    for (;;) {
        int64_t h = (int64_t)atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (h >= J->KVH) return;
        attn_head(J, h);
    }
}

/* out [H, D] = attention of q [H, D] over the first L rows of each KV head of k and v. */
int attn_decode_f32(const float *q, const float *k, const float *v, float *out, int64_t H, int64_t KVH,
                    int64_t L, int64_t D, int64_t head_stride, float scale, int n_threads) {
    if (H <= 0 || KVH <= 0 || H % KVH != 0 || L <= 0 || D <= 0) return INT4_EBADARG;
    if (head_stride < L * D || !q || !k || !v || !out) return INT4_EBADARG;
    float *scores = malloc((size_t)H * L * sizeof(float));
    if (!scores) return INT4_ENOMEM;
    attn_job_t J = {.q = q, .k = k, .v = v, .out = out, .G = H / KVH, .L = L, .D = D,
                    .head_stride = head_stride, .scale = scale, .scores = scores, .KVH = KVH};
    atomic_init(&J.next, 0);
    /* The GEMVs' rule: a second thread from 2 x MIN_WEIGHTS_PER_THREAD values read (2 MiB of k and v). */
    int64_t threads = n_threads < 1 ? 1 : n_threads;
    int64_t by_work = (2 * KVH * L * D) / MIN_WEIGHTS_PER_THREAD;
    if (threads > by_work) threads = by_work < 1 ? 1 : by_work;
    if (threads > KVH) threads = KVH;
    run_parallel(attn_run_range, &J, (int)threads);
    free(scores);
    return INT4_OK;
}
