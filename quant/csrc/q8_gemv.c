/* int8 x float32 matrix products for a quantized lm_head (mixtral_chat.quant.int8).
 *
 * Included at the end of int4_gemv.c, so that it shares the thread pool (run_parallel), the
 * AVX2 detection (INT4_SIMD) and the error codes; not compiled on its own.
 *
 * Layout, for a weight W [N, K] with K a multiple of 32, G = K / 32:
 *   qweight int8 [N, K]      codes -127..127
 *   scales float32 [N, G]    W[n, k] = q[n, k] * scales[n, k / 32]
 * q8_linear_f32 computes y [M, N] = x [M, K] @ W^T, all row-major and contiguous: llama.cpp's
 * Q8_0 x Q8_0 scheme. Each 32 columns of x are rounded to int8 with one float scale (once per
 * call, shared by all rows of W); a group's 32 products are summed exactly in int32 lanes of 4
 * (_mm256_maddubs_epi16 on |x| and sign-adjusted codes, then _mm256_madd_epi16), which are
 * scaled and accumulated in float. ~0.6% relative error against the exact product with the
 * dequantized W on Gaussian data (x's rounding); one byte per weight plus 1/8 for the scales, where float32
 * reads four.
 *
 * AVX2 only: the product is memory bound at one byte per weight (twice int4's), so wider
 * registers would not read it faster. Without AVX2 the portable loop below computes the same
 * integers and the same float operations in the same order, so every path gives the same bits.
 */

#define Q8_GROUP 32
#define Q8_ROWS 4 /* weight rows per tile: they share each load of x */

typedef struct {
    const int8_t *qweight;
    const float *scales;
    const int8_t *xq; /* [M][K]: x rounded to int8 per 32 columns */
    const float *dx;  /* [M][G]: the scale of each 32 columns of x */
    float *y;
    int64_t M, N, K, G;
    int64_t chunk; /* rows of W per work item */
    atomic_llong next;
} q8_job_t;

/* Row m of x -> int8 codes and per-32-column scales (round half away from zero, as llama.cpp).
 * A NaN or infinity in a group makes its scale NaN or infinite and its codes 0, so every output
 * it reaches is NaN (0 * inf, or NaN): a broken weight upstream shows in the logits, as it does
 * through float arithmetic (fmaxf alone would drop a NaN). */
static void q8_prepare_row(const float *x, int64_t K, int8_t *xq, float *dx) {
    for (int64_t g = 0; g < K / Q8_GROUP; g++) {
        const float *v = x + g * Q8_GROUP;
        float amax = 0.0f;
        for (int i = 0; i < Q8_GROUP; i++) {
            float a = fabsf(v[i]);
            amax = (a > amax || a != a) && amax == amax ? a : amax; /* a NaN, once seen, stays */
        }
        float d = amax / 127.0f;
        float inv = d > 0.0f && d < INFINITY ? 1.0f / d : 0.0f;
        dx[g] = d;
        for (int i = 0; i < Q8_GROUP; i++) xq[g * Q8_GROUP + i] = (int8_t)roundf(v[i] * inv);
    }
}

/* The float part, shared by every path: lane j of `acc` holds the scaled sums of products
 * 4j..4j+3 (of each group, in group order); the 8 lanes are added as hsum256 adds them. */
static inline float q8_lanes_sum(const float acc[8]) {
    float a = acc[0] + acc[4], b = acc[1] + acc[5], c = acc[2] + acc[6], d = acc[3] + acc[7];
    return (a + c) + (b + d);
}

#ifdef INT4_SIMD
/* 8 int32 lanes: lane j = the sum of products 4j..4j+3 of 32 int8 codes w and x (|x| <= 127). */
static inline __m256i q8_group_dot(__m256i w, __m256i ax, __m256i x) {
    __m256i sw = _mm256_sign_epi8(w, x); /* w with x's sign: |x| * sw = x * w, exactly */
    __m256i pairs = _mm256_maddubs_epi16(ax, sw); /* 16 int16: at most 2 * 127 * 127, no saturation */
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

static inline float q8_hsum(__m256 v) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    return q8_lanes_sum(lanes);
}

/* y[m, n0 .. n0 + Q8_ROWS) for one row m of x; the rows of W share each load of x. */
static inline void q8_tile_avx2(const q8_job_t *J, int64_t n0, int64_t m) {
    const int8_t *xq = J->xq + m * J->K;
    const float *dx = J->dx + m * J->G;
    /* The next tile (Q8_ROWS rows, contiguous with these) is prefetched in address order while
     * this one is read, 128 bytes per group, as the int4 kernel does (prefetch_next_tile): into
     * L1 while a tile is 4 KB or less, else into L2. Without it the hardware prefetchers alone
     * read 32000x512 (the small bench shape) at 10.9 GB/s and 32000x4096 (Mixtral's lm_head) at
     * 20.3 GB/s on 2 threads; with it 24.0 and 27.3 (Zen 4, from DRAM; docs/BENCHMARKS.md). */
    const int8_t *next = J->qweight + (n0 + Q8_ROWS) * J->K;
    const float *next_scales = J->scales + (n0 + Q8_ROWS) * J->G;
    const int into_l2 = m != 0 ? -1 : Q8_ROWS * J->K > 4096; /* -1: the first row of x brought them */
    __m256 acc[Q8_ROWS];
    for (int r = 0; r < Q8_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < J->G; g++) {
        if (into_l2 == 1) {
            __builtin_prefetch(next + g * 128, 0, 2);
            __builtin_prefetch(next + g * 128 + 64, 0, 2);
        } else if (into_l2 == 0) {
            __builtin_prefetch(next + g * 128, 0, 3);
            __builtin_prefetch(next + g * 128 + 64, 0, 3);
        }
        if (into_l2 >= 0 && (g & 3) == 0) __builtin_prefetch(next_scales + g * 4, 0, 3); /* 64 bytes per 4 groups */
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + g * Q8_GROUP));
        __m256i ax = _mm256_sign_epi8(x, x);
        for (int r = 0; r < Q8_ROWS; r++) {
            const int64_t n = n0 + r;
            __m256i w = _mm256_loadu_si256((const __m256i *)(J->qweight + n * J->K + g * Q8_GROUP));
            __m256 d = _mm256_set1_ps(dx[g] * J->scales[n * J->G + g]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_group_dot(w, ax, x)), d, acc[r]);
        }
    }
    for (int r = 0; r < Q8_ROWS; r++) J->y[m * J->N + n0 + r] = q8_hsum(acc[r]);
}

static inline void q8_row_avx2(const q8_job_t *J, int64_t n, int64_t m) {
    const int8_t *xq = J->xq + m * J->K;
    const float *dx = J->dx + m * J->G;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < J->G; g++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + g * Q8_GROUP));
        __m256i w = _mm256_loadu_si256((const __m256i *)(J->qweight + n * J->K + g * Q8_GROUP));
        __m256 d = _mm256_set1_ps(dx[g] * J->scales[n * J->G + g]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_group_dot(w, _mm256_sign_epi8(x, x), x)), d, acc);
    }
    J->y[m * J->N + n] = q8_hsum(acc);
}
#endif

/* Portable: the same integers and float operations as the AVX2 path, one at a time. */
static void q8_row_scalar(const q8_job_t *J, int64_t n, int64_t m) {
    const int8_t *xq = J->xq + m * J->K;
    const float *dx = J->dx + m * J->G;
    const int8_t *w = J->qweight + n * J->K;
    float acc[8] = {0};
    for (int64_t g = 0; g < J->G; g++) {
        float d = dx[g] * J->scales[n * J->G + g];
        for (int j = 0; j < 8; j++) {
            int32_t s = 0;
            for (int i = 4 * j; i < 4 * j + 4; i++) s += (int32_t)xq[g * Q8_GROUP + i] * w[g * Q8_GROUP + i];
            acc[j] = fmaf((float)s, d, acc[j]);
        }
    }
    J->y[m * J->N + n] = q8_lanes_sum(acc);
}

static void q8_rows(const q8_job_t *J, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1;) {
#ifdef INT4_SIMD
        if (n + Q8_ROWS <= n1) {
            for (int64_t m = 0; m < J->M; m++) q8_tile_avx2(J, n, m);
            n += Q8_ROWS;
            continue;
        }
        for (int64_t m = 0; m < J->M; m++) q8_row_avx2(J, n, m);
#else
        for (int64_t m = 0; m < J->M; m++) q8_row_scalar(J, n, m);
#endif
        n++;
    }
}

static void q8_run_range(void *arg, int index, int count) {
    q8_job_t *J = (q8_job_t *)arg;
    (void)index;
    (void)count;
    const int64_t items = (J->N + J->chunk - 1) / J->chunk;
    for (;;) {
        int64_t item = (int64_t)atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (item >= items) return;
        int64_t n0 = item * J->chunk;
        q8_rows(J, n0, n0 + J->chunk < J->N ? n0 + J->chunk : J->N);
    }
}

/* y [M, N] = x [M, K] @ W^T for W stored as (qweight int8 [N, K], scales float32 [N, K / 32]). */
int q8_linear_f32(const int8_t *qweight, const float *scales, const float *x, float *y, int64_t M,
                  int64_t N, int64_t K, int n_threads) {
    if (M < 0 || N < 0 || K <= 0 || K % Q8_GROUP != 0) return INT4_EBADARG;
    if (M == 0 || N == 0) return INT4_OK;
    if (!qweight || !scales || !x || !y) return INT4_EBADARG;
    const int64_t G = K / Q8_GROUP;
    int8_t *xq = aligned_alloc(64, (((size_t)M * K + 63) / 64) * 64);
    float *dx = malloc((size_t)M * G * sizeof(float));
    if (!xq || !dx) {
        free(xq);
        free(dx);
        return INT4_ENOMEM;
    }
    for (int64_t m = 0; m < M; m++) q8_prepare_row(x + m * K, K, xq + m * K, dx + m * G);
    q8_job_t J = {.qweight = qweight, .scales = scales, .xq = xq, .dx = dx, .y = y,
                  .M = M, .N = N, .K = K, .G = G};
    int64_t threads = n_threads < 1 ? 1 : n_threads;
    int64_t by_work = (N * K * (M < 4 ? M : 4)) / MIN_WEIGHTS_PER_THREAD;
    if (threads > by_work) threads = by_work < 1 ? 1 : by_work;
    if (threads > N) threads = N;
    /* ~16 chunks per thread, a multiple of the row tile. */
    int64_t chunk = (N + threads * 16 - 1) / (threads * 16);
    J.chunk = chunk < Q8_ROWS ? Q8_ROWS : (chunk + Q8_ROWS - 1) / Q8_ROWS * Q8_ROWS;
    atomic_init(&J.next, 0);
    run_parallel(q8_run_range, &J, (int)threads);
    free(xq);
    free(dx);
    return INT4_OK;
}
