/* int4 x float32 matrix products on the stored int4 layout of mixtral_chat.quant.int4.
 *
 * Plain C11 with pthreads; no Python or torch headers. Compiled and loaded at run time by
 * mixtral_chat/quant/native.py (ctypes), which documents the build.
 *
 * Layout, for a weight W [N, Kp] with group size g (32, 64, 128 or 256), G = Kp / g:
 *   qweight uint8 [N, Kp/2]   codes 0..15, column 2j in the high nibble of byte j, 2j+1 in the low
 *   scales, zeros bf16 [N, G]  W[n, k] = (q[n, k] - 8) * scales[n, k/g] + zeros[n, k/g]
 * int4_linear_f32 computes y [M, N] = x [M, Kp] @ W^T, all row-major and contiguous, any M and N.
 *
 * Variants (AVX2 builds):
 *   INT4_VARIANT_Q8  (default) llama.cpp's Q4 x Q8 scheme: each 32 columns of x are rounded to
 *                    int8 with one float scale dx (once per call, shared by all rows of W), the
 *                    codes meet them in _mm256_maddubs_epi16 / _mm256_madd_epi16, and each group
 *                    adds its zero times the exact float sum of x (see zero_terms). ~0.6% relative
 *                    error on Gaussian data; memory bound at batch 1 on 2 Zen cores.
 *   INT4_VARIANT_F32 codes converted to float, FMA with float32 x: float32 accuracy, but ~3x the
 *                    instructions per weight byte, compute bound at ~half the Q8 variant's speed.
 * Both permute x once per call into the order in which a 32-byte load of codes unpacks (high
 * nibbles, then low nibbles) instead of shuffling the weights.
 *
 * cb4_linear_f32 runs 4-bit code-book weights (bitsandbytes' nf4 and fp4, whose rows are laid
 * out like the int4 codes above) with the Q8 variant's tiles: a 16-entry byte table turns each
 * code into 64 + its value rounded to 1/63 of the largest (vpshufb), and each block's absmax
 * (float32, or double-quantized) replaces scale and zero. ~1.3% relative error (int4: ~0.6%).
 * Without AVX2 (another CPU, another architecture) a portable scalar loop computes the product in
 * float; int4_native_has_avx2() says which was compiled.
 *
 * AVX-512 (int4, Q8 variant; see "AVX-512" below): compiled with target attributes and chosen per
 * call from the CPU's features (int4_native_isa, which tests and benchmarks may cap): batch 1 on
 * 512-bit registers, two 64-column blocks each, with vpdpbusd where AVX512_VNNI is present;
 * batches > 1 with vpdpbusd on 256 bits. Bit-identical to the AVX2 path.
 * int4_linear_multi runs several weights with the same Kp in one call (w1|w3, q|k|v).
 *
 * Threads: a small persistent pool of pthreads (the calling thread works too) takes chunks of
 * contiguous rows of W from a shared counter until none is left, so a thread that gets its core
 * late does less instead of holding up the call; calls from several threads are serialized. Every output is computed by the same sequence of operations whatever the thread
 * count, the chunking or the batch size, so results do not depend on them.
 */

#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The vector kernels need AVX2 and FMA (every AVX2 CPU has both; -march=native sets both). */
#if defined(__AVX2__) && defined(__FMA__)
#define INT4_SIMD 1
#include <immintrin.h>
#endif

#define INT4_VARIANT_Q8 0
#define INT4_VARIANT_F32 1

#define INT4_OK 0
#define INT4_EBADARG 1
#define INT4_ENOMEM 2

#define MAX_WORKERS 255
/* Below this many weights per thread, extra threads cost more (waking them) than they save. */
#define MIN_WEIGHTS_PER_THREAD (1 << 18)
/* Rows of x processed together against one weight row (registers: accumulators per row). */
#define M_TILE 4

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ------------------------------------------------------------------------------------------- */
/* Thread pool                                                                                 */
/* ------------------------------------------------------------------------------------------- */

/* fn(arg, index, count) must take work from a shared counter until none is left: the calling
 * thread runs it too and returns once it comes back (see run_parallel). */
typedef void (*range_fn)(void *arg, int index, int count);

/* One step of a wait: a pause for the first 4096, then the core is yielded, so that a thread
 * waiting on one whose core is busy elsewhere lets it run. */
static inline void pause_or_yield(int spins) {
#ifdef INT4_SIMD
    if (spins < 4096) {
        _mm_pause();
        return;
    }
#endif
    sched_yield();
}

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one parallel call at a time */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int pool_workers;            /* started workers, ids 1..pool_workers */
static atomic_ulong pool_gen;       /* incremented per dispatched task (under pool_mu) */
/* > 0 while a caller makes several calls in a row (decode_stack.c): an idle worker then spins
 * for the next task instead of sleeping, whose wake-up costs tens of microseconds. */
static atomic_int pool_hot;
static range_fn task_fn;
static void *task_arg;
static int task_count;              /* threads of the current task; workers with id >= it idle */
static int task_open;               /* workers may still join the current task */
static int task_running;            /* workers inside the current task's function */

typedef struct {
    int id;
    unsigned long gen;
} worker_start;

static void *worker_main(void *p) {
    worker_start start = *(worker_start *)p;
    free(p);
    unsigned long seen = start.gen;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        if (atomic_load(&pool_gen) == seen && atomic_load_explicit(&pool_hot, memory_order_relaxed) > 0) {
            pthread_mutex_unlock(&pool_mu);
            for (int spins = 0; atomic_load_explicit(&pool_hot, memory_order_relaxed) > 0 &&
                                atomic_load_explicit(&pool_gen, memory_order_relaxed) == seen;
                 spins++)
                pause_or_yield(spins);
            pthread_mutex_lock(&pool_mu);
        }
        while (atomic_load(&pool_gen) == seen) pthread_cond_wait(&pool_go, &pool_mu);
        seen = atomic_load(&pool_gen);
        /* A worker that wakes after the caller finished (all the work taken) stays out. */
        if (task_open && start.id < task_count) {
            range_fn fn = task_fn;
            void *arg = task_arg;
            int count = task_count;
            task_running++;
            pthread_mutex_unlock(&pool_mu);
            fn(arg, start.id, count);
            pthread_mutex_lock(&pool_mu);
            if (--task_running == 0 && !task_open) pthread_cond_signal(&pool_done);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's threads: start over with fresh locks. */
static void pool_atfork_child(void) {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    call_mu = mu;
    pool_mu = mu;
    pool_go = cv;
    pool_done = cv;
    pool_workers = 0;
    task_count = 0;
    task_open = 0;
    task_running = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_atfork_child); }

/* Called with call_mu held. Returns how many workers run (may be fewer if creation fails). */
static int pool_grow(int wanted) {
    if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
    while (pool_workers < wanted) {
        worker_start *start = malloc(sizeof *start);
        if (!start) break;
        pthread_mutex_lock(&pool_mu);
        start->id = pool_workers + 1;
        start->gen = atomic_load(&pool_gen);
        pthread_mutex_unlock(&pool_mu);
        /* Workers never take signals: the interpreter handles them in its own threads. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t thread;
        int rc = pthread_create(&thread, &attr, worker_main, start);
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc != 0) {
            free(start);
            break;
        }
        pool_workers++;
    }
    return pool_workers;
}

static void run_parallel(range_fn fn, void *arg, int count) {
    if (count <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&call_mu);
    int workers = pool_grow(count - 1);
    if (count > workers + 1) count = workers + 1;
    if (count <= 1) {
        pthread_mutex_unlock(&call_mu);
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool_mu);
    task_fn = fn;
    task_arg = arg;
    task_count = count;
    task_open = 1;
    atomic_fetch_add(&pool_gen, 1);
    pthread_cond_broadcast(&pool_go);
    pthread_mutex_unlock(&pool_mu);
    /* `fn` takes work until none is left; then only the workers already inside are waited for
     * (a worker whose core is busy elsewhere does not hold up the call). */
    fn(arg, 0, count);
    pthread_mutex_lock(&pool_mu);
    task_open = 0;
    while (task_running > 0) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
    pthread_mutex_unlock(&call_mu);
}

/* ------------------------------------------------------------------------------------------- */
/* Kernels                                                                                     */
/* ------------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *qweight;
    const uint16_t *scales, *zeros;
    const float *x;
    float *y;
    int64_t M, N, Kp, g, G;
    int64_t ldy;  /* y's row stride: N, or the total rows when several weights share one call */
    int64_t nb;   /* 64-column blocks per row, the last one possibly half (Kp % 64 == 32) */
    int variant;
    int isa;               /* ISA_* of the Q8 path, chosen once per call */
    int64_t chunk;         /* rows per work item */
    /* Prepared activations, per row of x (AVX2 variants). */
    int8_t *xq;   /* [M][nb * 64] int8, permuted (Q8) */
    float *dxv;   /* [M][nb * 8]: per block, the two 32-column scales, each repeated 4 times (Q8) */
    float *xp;    /* [M][nb * 64] float, permuted (F32) */
    float *xsum;  /* [M][G]: exact sum of x over each group */
    float *xqsum; /* [M][G]: sum of the rounded x the codes meet (Q8), or xsum itself (F32) */
    /* Code-book weights (nf4, fp4): W[n, k] = quant_map[q[n, k]] * absmax[n * G + k / g]. */
    int codebook;
    const float *quant_map;  /* [16] (the portable path computes with it) */
    int8_t lut[16];          /* 64 + round(63 * quant_map[c] / qmax): 1..127 */
    float out_scale;         /* qmax / 63 */
    const float *absmax;     /* [N * G] float32, or NULL with double quantization: */
    const uint8_t *absmax_q; /* [N * G] codes of absmax - offset, */
    const float *nested_absmax, *nested_map; /* one scale per 256 blocks, the 256-entry map, */
    float absmax_offset;     /* and the offset */
    int32_t *xcorr; /* [M][nb * 8]: per block 64 * (sum of the rounded x) of each 32 columns, in lanes 0 and 4 */
} job_t;

/* The absmax of block gi of row n. */
static inline float cb_absmax(const job_t *J, int64_t n, int64_t gi) {
    int64_t i = n * J->G + gi;
    if (J->absmax) return J->absmax[i];
    return J->nested_map[J->absmax_q[i]] * J->nested_absmax[i / 256] + J->absmax_offset;
}

/* Sum over groups of zero * xsum - 8 scale * xqsum, for the MT rows of x starting at m0.
 *
 * With codes q and rounded activations xq (scale dx per 32 columns), a group contributes
 *   scale * sum (q - 8) xq dx + zero * sum x  =  scale * sum q xq dx - 8 scale * sum xq dx + zero * sum x
 * The first term is the kernel's integer dot product; the others are this one. Centering the
 * codes on 8 (not 0) before they meet the rounding error of x keeps that error proportional to
 * |W - zero| instead of |W - zero + 8 scale|: 3-4x smaller on Gaussian weights. */
static inline void zero_terms(const job_t *J, int64_t n, int64_t m0, int MT, float *out) {
    const uint16_t *s = J->scales + n * J->G, *z = J->zeros + n * J->G;
    int64_t gi = 0;
    for (int i = 0; i < MT; i++) out[i] = 0.0f;
#ifdef INT4_SIMD
    __m256 acc[M_TILE];
    for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
    for (; gi + 8 <= J->G; gi += 8) {
        __m256 sv = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + gi))), 16));
        __m256 zv = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(z + gi))), 16));
        __m256 s8 = _mm256_mul_ps(_mm256_set1_ps(8.0f), sv);
        for (int i = 0; i < MT; i++) {
            acc[i] = _mm256_fmadd_ps(zv, _mm256_loadu_ps(J->xsum + (m0 + i) * J->G + gi), acc[i]);
            acc[i] = _mm256_fnmadd_ps(s8, _mm256_loadu_ps(J->xqsum + (m0 + i) * J->G + gi), acc[i]);
        }
    }
    for (int i = 0; i < MT; i++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[i] = _mm_cvtss_f32(h);
    }
#endif
    for (; gi < J->G; gi++) {
        float zf = bf16_to_f32(z[gi]), s8 = 8.0f * bf16_to_f32(s[gi]);
        for (int i = 0; i < MT; i++)
            out[i] += zf * J->xsum[(m0 + i) * J->G + gi] - s8 * J->xqsum[(m0 + i) * J->G + gi];
    }
}

#ifdef INT4_SIMD

/* Position of column c (0..63) of a 64-column block after the permutation: the order in which a
 * 32-byte load of codes unpacks as [high nibbles (even columns) | low nibbles (odd columns)],
 * each half being [columns 0..31 | columns 32..63] in 128-bit lanes. A half block (the last one
 * when Kp % 64 == 32) uses the same positions, columns 32..63 being zero. */
static inline int permuted_position(int c) { return (c & 1) * 32 + (c >> 5) * 16 + ((c & 31) >> 1); }

static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static inline float hmax256(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* 32 floats of x -> their int8 codes as [even columns (16 bytes) | odd columns (16 bytes)], with
 * the scale dx (codes * dx ~ x), the float sum of x and the sum of the codes.
 * Non-finite x gives garbage codes but a non-finite sum, which reaches the output. */
static inline __m256i quantize_half(const float *x, float *dx, float *sum, int *qsum) {
    __m256 a0 = _mm256_loadu_ps(x), a1 = _mm256_loadu_ps(x + 8);
    __m256 a2 = _mm256_loadu_ps(x + 16), a3 = _mm256_loadu_ps(x + 24);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a0), _mm256_andnot_ps(sign, a1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, a2), _mm256_andnot_ps(sign, a3)));
    float amax = hmax256(m);
    *sum = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    *dx = amax / 127.0f;
    /* Rounds to nearest even, like lrintf; |x| * 127 / amax <= 127 up to rounding, which
     * still rounds to 127. */
    __m256 inv = _mm256_set1_ps((amax > 0.0f && isfinite(amax)) ? 127.0f / amax : 0.0f);
    __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(a0, inv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(a1, inv));
    __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(a2, inv)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(a3, inv));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(1, 0, 3, 2)));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(2, 3, 0, 1)));
    *qsum = _mm_cvtsi128_si32(t4);
    /* Per 128-bit lane: lane 0 columns 0-3, 8-11, 16-19, 24-27; lane 1 columns 4-7, 12-15, ... */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* natural order */
    b = _mm256_shuffle_epi8(b, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4,
                                                6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    return _mm256_permute4x64_epi64(b, _MM_SHUFFLE(3, 1, 2, 0));
}

/* x row -> permuted int8 codes, per-32-column scales, group sums (Q8); permuted floats (F32). */
static void prepare_row(const job_t *J, int64_t m) {
    const float *x = J->x + m * J->Kp;
    float *xsum = J->xsum + m * J->G;
    float *xqsum = J->xqsum + m * J->G;
    if (J->variant == INT4_VARIANT_F32) {
        for (int64_t gi = 0; gi < J->G; gi++) {
            float s = 0.0f;
            for (int64_t k = gi * J->g; k < (gi + 1) * J->g; k++) s += x[k];
            xsum[gi] = s;
        }
        for (int64_t b = 0; b < J->nb; b++) {
            int64_t k0 = b * 64;
            int cols = (int)(J->Kp - k0 < 64 ? J->Kp - k0 : 64);
            float *out = J->xp + m * J->nb * 64 + b * 64;
            for (int c = 0; c < 64; c++) out[permuted_position(c)] = c < cols ? x[k0 + c] : 0.0f;
        }
        return;
    }
    memset(xsum, 0, (size_t)J->G * sizeof(float));
    memset(xqsum, 0, (size_t)J->G * sizeof(float));
    for (int64_t b = 0; b < J->nb; b++) {
        int64_t k0 = b * 64;
        int8_t *out = J->xq + m * J->nb * 64 + b * 64;
        float dx[2] = {0.0f, 0.0f};
        int qs[2] = {0, 0};
        __m256i h[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int half = 0; half < 2 && k0 + half * 32 < J->Kp; half++) {
            float sum;
            int qsum;
            h[half] = quantize_half(x + k0 + half * 32, &dx[half], &sum, &qsum);
            qs[half] = qsum;
            int64_t gi = (k0 + half * 32) / J->g;
            xsum[gi] += sum;
            xqsum[gi] += dx[half] * (float)qsum;
        }
        _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(h[0], h[1], 0x20));
        _mm256_storeu_si256((__m256i *)(out + 32), _mm256_permute2x128_si256(h[0], h[1], 0x31));
        _mm256_storeu_ps(J->dxv + m * J->nb * 8 + b * 8,
                         _mm256_set_m128(_mm_set1_ps(dx[1]), _mm_set1_ps(dx[0])));
        if (J->xcorr) _mm256_storeu_si256((__m256i *)(J->xcorr + m * J->nb * 8 + b * 8),
                                          _mm256_setr_epi32(64 * qs[0], 0, 0, 0, 64 * qs[1], 0, 0, 0));
    }
}

/* Scales of groups gi and gi + 1 (g = 32) as [s0 x4 | s1 x4]; only gi when `one`. */
static inline __m256 scale_pair(const uint16_t *s, int64_t gi, int one) {
    uint32_t bits = one ? (uint32_t)s[gi] : ((uint32_t)s[gi] | ((uint32_t)s[gi + 1] << 16));
    __m128i v = _mm_unpacklo_epi16(_mm_setzero_si128(), _mm_cvtsi32_si128((int)bits));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(v)),
                                    _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* Codes of one 64-column block as [high nibbles | low nibbles] bytes; a half block is zero-padded. */
static inline void load_codes(const uint8_t *w, int half, __m256i *hi, __m256i *lo) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i v = half ? _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i *)w), 0)
                     : _mm256_loadu_si256((const __m256i *)w);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    *lo = _mm256_and_si256(v, m4);
}

/* 8 int32 partial sums of q * xq over a block: lanes 0..3 columns 0..31, lanes 4..7 columns 32..63. */
static inline __m256 block_dot_q8(__m256i hi, __m256i lo, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)xq));
    __m256i b = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + 32)));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(a, b), ones));
}

/* Prefetch one tile ahead: while block b of these NR rows is read, the lines NR * 32 * b ..
 * NR * 32 * (b + 1) of the next NR rows (contiguous with these), so that the next tile arrives,
 * in address order, while this one is computed. With the hardware prefetchers alone, short rows
 * (2 KB, K = 4096) ran 1.5x slower than memory bandwidth allows; prefetching each row of the
 * next tile at the position read in this one was 10% slower on them than in address order; L2
 * or non-temporal hints measured the same. Prefetching past the end of the matrix is harmless
 * (a prefetch never faults). (__builtin_prefetch: GCC 12 dropped _mm_prefetch here.) */
static inline void prefetch_next_tile(const uint8_t *w, int64_t row_bytes, int64_t b, int NR, int64_t m0) {
    if (m0 != 0) return; /* the first m tile already brought them */
    const uint8_t *next = w + NR * row_bytes + b * NR * 32;
    /* Rows of 2 KB or more (K >= 4096) into L2 only: a tile ahead is then NR * 2 KB or more,
     * which, brought into L1 beside the tile being read and x, was evicted before use. Measured
     * on Zen 4, DRAM-bound, batch 1 (docs/BENCHMARKS.md, 2026-12-07): 4096x14336 +37% at 2 threads
     * and +48% at 1, 14336x4096 +11% at 2 threads; rows of 1 KB (K = 2048) 17% slower that way. */
    if (row_bytes >= 2048)
        for (int r = 0; r < NR; r += 2) __builtin_prefetch(next + r * 32, 0, 2);
    else
        for (int r = 0; r < NR; r += 2) __builtin_prefetch(next + r * 32, 0, 3);
}

/* Code-book weights: the codes become u = 64 + L (L ~ 63 * quant_map / qmax, so u is 1..127)
 * through a 16-entry byte table (vpshufb), and meet the int8 x like int4 codes do. Each product
 * pair can reach 2 * 127 * 127, so the two halves are widened to int32 separately (int4's codes
 * are small enough to add first), and 64 * (sum of x) comes off in integers (xcorr). */
static inline __m256 block_dot_cb(__m256i hi, __m256i lo, const int8_t *xq, const int32_t *corr) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)xq)), ones);
    __m256i b = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + 32))), ones);
    return _mm256_cvtepi32_ps(
        _mm256_sub_epi32(_mm256_add_epi32(a, b), _mm256_loadu_si256((const __m256i *)corr)));
}

/* y[m0 .. m0+MT, n .. n+NR]: NR weight rows against MT rows of x, NR * MT <= 8 accumulators.
 * Several rows at once give independent FMA chains (one chain is latency bound) and share
 * the loads of x. CB (a constant: each caller gets its own copy): code-book weights (absmax
 * scales, codes through the table) instead of int4 (bf16 scales and zeros). */
static inline __attribute__((always_inline)) void tile_q8(const job_t *J, int64_t n, const int NR, int64_t m0,
                                                          const int MT, const int CB) {
    const int64_t nb = J->nb, G = J->G, row_bytes = J->Kp / 2;
    const uint8_t *w = J->qweight + n * row_bytes;
    const uint16_t *s = CB ? NULL : J->scales + n * G; /* (code books have no bf16 scales) */
    const int8_t *xq = J->xq + m0 * nb * 64;
    const float *dxv = J->dxv + m0 * nb * 8;
    const int32_t *xc = CB ? J->xcorr + m0 * nb * 8 : NULL;
    const __m256i lut = CB ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)J->lut))
                           : _mm256_setzero_si256();
#define TILE_DOT(hi, lo, i, b)                                                            \
    (CB ? block_dot_cb(hi, lo, xq + (i) * nb * 64 + (b) * 64, xc + (i) * nb * 8 + (b) * 8) \
        : block_dot_q8(hi, lo, xq + (i) * nb * 64 + (b) * 64))
    __m256 acc[8][4];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MT; i++) acc[r][i] = _mm256_setzero_ps();
    if (J->g == 32) {
        for (int64_t b = 0; b < nb; b++) {
            int half = (b + 1) * 64 > J->Kp;
            prefetch_next_tile(w, row_bytes, b, NR, m0);
            for (int r = 0; r < NR; r++) {
                __m256i hi, lo;
                load_codes(w + r * row_bytes + b * 32, half, &hi, &lo);
                __m256 sv;
                if (CB) {
                    hi = _mm256_shuffle_epi8(lut, hi);
                    lo = _mm256_shuffle_epi8(lut, lo);
                    float a1 = half ? 0.0f : cb_absmax(J, n + r, 2 * b + 1);
                    sv = _mm256_set_m128(_mm_set1_ps(a1), _mm_set1_ps(cb_absmax(J, n + r, 2 * b)));
                } else {
                    sv = scale_pair(s + r * G, 2 * b, half);
                }
                for (int i = 0; i < MT; i++) {
                    __m256 d = _mm256_mul_ps(sv, _mm256_loadu_ps(dxv + i * nb * 8 + b * 8));
                    acc[r][i] = _mm256_fmadd_ps(TILE_DOT(hi, lo, i, b), d, acc[r][i]);
                }
            }
        }
    } else {
        const int64_t bpg = J->g / 64;
        for (int64_t gi = 0; gi < G; gi++) {
            __m256 sv[8];
            for (int r = 0; r < NR; r++)
                sv[r] = _mm256_set1_ps(CB ? cb_absmax(J, n + r, gi) : bf16_to_f32(s[r * G + gi]));
            for (int64_t b = gi * bpg; b < (gi + 1) * bpg; b++) {
                prefetch_next_tile(w, row_bytes, b, NR, m0);
                for (int r = 0; r < NR; r++) {
                    __m256i hi, lo;
                    load_codes(w + r * row_bytes + b * 32, 0, &hi, &lo);
                    if (CB) {
                        hi = _mm256_shuffle_epi8(lut, hi);
                        lo = _mm256_shuffle_epi8(lut, lo);
                    }
                    for (int i = 0; i < MT; i++) {
                        __m256 d = _mm256_mul_ps(sv[r], _mm256_loadu_ps(dxv + i * nb * 8 + b * 8));
                        acc[r][i] = _mm256_fmadd_ps(TILE_DOT(hi, lo, i, b), d, acc[r][i]);
                    }
                }
            }
        }
    }
#undef TILE_DOT
    for (int r = 0; r < NR; r++) {
        if (CB) {
            for (int i = 0; i < MT; i++) J->y[(m0 + i) * J->ldy + n + r] = J->out_scale * hsum256(acc[r][i]);
            continue;
        }
        float zt[M_TILE];
        zero_terms(J, n + r, m0, MT, zt);
        for (int i = 0; i < MT; i++) J->y[(m0 + i) * J->ldy + n + r] = hsum256(acc[r][i]) + zt[i];
    }
}

/* Sum of q * x over the two 32-column halves of a block: (columns 0..31, columns 32..63). */
static inline void block_dot_f32(__m256i hi, __m256i lo, const float *xp, __m256 *a0, __m256 *a1) {
    __m128i h0 = _mm256_castsi256_si128(hi), h1 = _mm256_extracti128_si256(hi, 1);
    __m128i l0 = _mm256_castsi256_si128(lo), l1 = _mm256_extracti128_si256(lo, 1);
#define CV(v) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    __m256 s0 = _mm256_mul_ps(CV(h0), _mm256_loadu_ps(xp));
    __m256 s1 = _mm256_mul_ps(CV(_mm_srli_si128(h0, 8)), _mm256_loadu_ps(xp + 8));
    s0 = _mm256_fmadd_ps(CV(l0), _mm256_loadu_ps(xp + 32), s0);
    s1 = _mm256_fmadd_ps(CV(_mm_srli_si128(l0, 8)), _mm256_loadu_ps(xp + 40), s1);
    __m256 t0 = _mm256_mul_ps(CV(h1), _mm256_loadu_ps(xp + 16));
    __m256 t1 = _mm256_mul_ps(CV(_mm_srli_si128(h1, 8)), _mm256_loadu_ps(xp + 24));
    t0 = _mm256_fmadd_ps(CV(l1), _mm256_loadu_ps(xp + 48), t0);
    t1 = _mm256_fmadd_ps(CV(_mm_srli_si128(l1, 8)), _mm256_loadu_ps(xp + 56), t1);
#undef CV
    *a0 = _mm256_add_ps(s0, s1);
    *a1 = _mm256_add_ps(t0, t1);
}

static inline __attribute__((always_inline)) void row_f32(const job_t *J, int64_t n, int64_t m0,
                                                          const int MT) {
    const int64_t nb = J->nb, G = J->G;
    const uint8_t *w = J->qweight + n * (J->Kp / 2);
    const uint16_t *s = J->scales + n * G;
    const float *xp = J->xp + m0 * nb * 64;
    __m256 acc[M_TILE];
    for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
    if (J->g == 32) {
        for (int64_t b = 0; b < nb; b++) {
            int half = (b + 1) * 64 > J->Kp;
            __m256i hi, lo;
            load_codes(w + b * 32, half, &hi, &lo);
            __m256 s0 = _mm256_set1_ps(bf16_to_f32(s[2 * b]));
            __m256 s1 = half ? _mm256_setzero_ps() : _mm256_set1_ps(bf16_to_f32(s[2 * b + 1]));
            for (int i = 0; i < MT; i++) {
                __m256 a0, a1;
                block_dot_f32(hi, lo, xp + i * nb * 64 + b * 64, &a0, &a1);
                acc[i] = _mm256_fmadd_ps(a0, s0, acc[i]);
                acc[i] = _mm256_fmadd_ps(a1, s1, acc[i]);
            }
        }
    } else {
        const int64_t bpg = J->g / 64;
        for (int64_t gi = 0; gi < G; gi++) {
            __m256 ag[M_TILE];
            for (int i = 0; i < MT; i++) ag[i] = _mm256_setzero_ps();
            for (int64_t b = gi * bpg; b < (gi + 1) * bpg; b++) {
                __m256i hi, lo;
                load_codes(w + b * 32, 0, &hi, &lo);
                for (int i = 0; i < MT; i++) {
                    __m256 a0, a1;
                    block_dot_f32(hi, lo, xp + i * nb * 64 + b * 64, &a0, &a1);
                    ag[i] = _mm256_add_ps(ag[i], _mm256_add_ps(a0, a1));
                }
            }
            __m256 sv = _mm256_set1_ps(bf16_to_f32(s[gi]));
            for (int i = 0; i < MT; i++) acc[i] = _mm256_fmadd_ps(ag[i], sv, acc[i]);
        }
    }
    float zt[M_TILE];
    zero_terms(J, n, m0, MT, zt);
    for (int i = 0; i < MT; i++) J->y[(m0 + i) * J->ldy + n] = hsum256(acc[i]) + zt[i];
}

/* Tiles (rows of W x rows of x) measured fastest on a 2-core Zen: batch 1, 4 x 1 (1, 2 and 8
 * rows were 10-20% slower); batches > 1, 2 x 4 (1 x 4, 2 x 2, 3 x 2, 4 x 2 were 5-15% slower). */
#define Q8_NR1 4
#define Q8_NR 2
#define Q8_MT M_TILE

/* Rows m_begin..m_end of x, in tiles of Q8_MT (then the remainder), against NR weight rows. */
static inline __attribute__((always_inline)) void tile_q8_ms(const job_t *J, int64_t n, const int NR,
                                                             int64_t m_begin, int64_t m_end, const int CB) {
    int64_t m0 = m_begin;
    for (; m0 + Q8_MT <= m_end; m0 += Q8_MT) tile_q8(J, n, NR, m0, Q8_MT, CB);
    switch (m_end - m0) {
        case 1: tile_q8(J, n, NR, m0, 1, CB); break;
        case 2: if (Q8_MT > 2) tile_q8(J, n, NR, m0, 2, CB); break;
        case 3: if (Q8_MT > 3) tile_q8(J, n, NR, m0, 3, CB); break;
        default: break;
    }
}

/* Every output of a row is computed by the same sequence of operations whatever the tiling,
 * so results do not depend on the batch size, the chunking or the thread count. */
static inline __attribute__((always_inline)) void rows_q8_of(const job_t *J, int64_t n0, int64_t n1,
                                                             const int CB) {
    int64_t n = n0;
    if (J->M == 1) {
        for (; n + Q8_NR1 <= n1; n += Q8_NR1) tile_q8(J, n, Q8_NR1, 0, 1, CB);
        for (; n < n1; n++) tile_q8(J, n, 1, 0, 1, CB);
        return;
    }
    for (; n + Q8_NR <= n1; n += Q8_NR) tile_q8_ms(J, n, Q8_NR, 0, J->M, CB);
    for (; n < n1; n++) tile_q8_ms(J, n, 1, 0, J->M, CB);
}

static void rows_q8(const job_t *J, int64_t n0, int64_t n1) {
    if (J->codebook)
        rows_q8_of(J, n0, n1, 1);
    else
        rows_q8_of(J, n0, n1, 0);
}

static void rows_f32(const job_t *J, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= J->M; m0 += 4) row_f32(J, n, m0, 4);
        switch (J->M - m0) {
            case 1: row_f32(J, n, m0, 1); break;
            case 2: row_f32(J, n, m0, 2); break;
            case 3: row_f32(J, n, m0, 3); break;
            default: break;
        }
    }
}

/* ------------------------------------------------------------------------------------------- */
/* AVX-512 (int4, Q8 variant): two 64-column blocks per 512-bit register                        */
/* ------------------------------------------------------------------------------------------- */

/* Compiled with target attributes whatever -march says, and run only where the CPU (and the
 * OS, which libgcc's cpu check asks through XGETBV) supports them: int4_select_isa. Integer dot
 * products are exact in both (the AVX2 path's int16 sums cannot saturate: 2 * 15 * 127 * 2 <
 * 32767), so each block gives the same int32 lanes, and each block's lanes meet the same float
 * operations in the same order as on the AVX2 path (the two blocks of a register are added to
 * the 256-bit accumulators one after the other): results are bit-identical to AVX2's. VNNI
 * (vpdpbusd) replaces maddubs + add + madd; without it AVX512BW runs those on 512 bits. */
#if defined(__GNUC__) || defined(__clang__)
#define INT4_AVX512 1
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define AVX512_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

/* The tile of tile_q8 (int4 weights only) on 512-bit registers; VNNI a constant. */
#define DEFINE_TILE512(NAME, TARGET, VNNI)                                                                   \
    static inline __attribute__((always_inline)) TARGET void NAME(const job_t *J, int64_t n, const int NR,     \
                                                                  int64_t m0, const int MT) {                 \
        const int64_t nb = J->nb, G = J->G, row_bytes = J->Kp / 2, full = J->Kp / 64;                       \
        const int64_t bpg = J->g / 64; /* blocks per group; 0 for g = 32 (two groups per block) */          \
        const int gshift = bpg == 4 ? 2 : bpg == 2 ? 1 : 0; /* b >> gshift: b's group (no division) */   \
        const uint8_t *w = J->qweight + n * row_bytes;                                                       \
        const uint16_t *s = J->scales + n * G;                                                               \
        const int8_t *xq = J->xq + m0 * nb * 64;                                                             \
        const float *dxv = J->dxv + m0 * nb * 8;                                                             \
        const __m512i m4 = _mm512_set1_epi8(0x0F);                                                           \
        __m256 acc[4][4];                                                                                    \
        for (int r = 0; r < NR; r++)                                                                         \
            for (int i = 0; i < MT; i++) acc[r][i] = _mm256_setzero_ps();                                   \
        int64_t b = 0;                                                                                       \
        for (; b + 2 <= full; b += 2) {                                                                      \
            prefetch_next_tile(w, row_bytes, b, NR, m0);                                                     \
            prefetch_next_tile(w, row_bytes, b + 1, NR, m0);                                                 \
            /* x of blocks b and b + 1: [b's | b+1's] bytes that meet the high, then the low nibbles */      \
            __m512i xh[4], xl[4];                                                                            \
            for (int i = 0; i < MT; i++) {                                                                   \
                const int8_t *xb = xq + i * nb * 64 + b * 64;                                                \
                xh[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)xb)),  \
                                           _mm256_loadu_si256((const __m256i *)(xb + 64)), 1);               \
                xl[i] = _mm512_inserti64x4(                                                                  \
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xb + 32))),                  \
                    _mm256_loadu_si256((const __m256i *)(xb + 96)), 1);                                      \
            }                                                                                                \
            for (int r = 0; r < NR; r++) {                                                                   \
                __m512i v = _mm512_loadu_si512((const void *)(w + r * row_bytes + b * 32));                 \
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), lo = _mm512_and_si512(v, m4);    \
                const uint16_t *sr = s + r * G;                                                              \
                __m256 s0 = bpg ? _mm256_set1_ps(bf16_to_f32(sr[b >> gshift])) : scale_pair(sr, 2 * b, 0);       \
                __m256 s1 = bpg ? _mm256_set1_ps(bf16_to_f32(sr[(b + 1) >> gshift]))                             \
                                : scale_pair(sr, 2 * b + 2, 0);                                              \
                __m512 sv = _mm512_insertf32x8(_mm512_castps256_ps512(s0), s1, 1);                           \
                for (int i = 0; i < MT; i++) {                                                               \
                    __m512i dot;                                                                             \
                    if (VNNI) {                                                                              \
                        dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xh[i]);                        \
                        dot = _mm512_dpbusd_epi32(dot, lo, xl[i]);                                           \
                    } else {                                                                                 \
                        __m512i a = _mm512_maddubs_epi16(hi, xh[i]), c = _mm512_maddubs_epi16(lo, xl[i]);    \
                        dot = _mm512_madd_epi16(_mm512_add_epi16(a, c), _mm512_set1_epi16(1));               \
                    }                                                                                        \
                    __m512 f = _mm512_cvtepi32_ps(dot);                                                      \
                    __m512 d = _mm512_mul_ps(sv, _mm512_loadu_ps(dxv + i * nb * 8 + b * 8));                 \
                    acc[r][i] = _mm256_fmadd_ps(_mm512_castps512_ps256(f), _mm512_castps512_ps256(d),        \
                                                acc[r][i]);                                                  \
                    acc[r][i] = _mm256_fmadd_ps(_mm512_extractf32x8_ps(f, 1), _mm512_extractf32x8_ps(d, 1),  \
                                                acc[r][i]);                                                  \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (; b < nb; b++) { /* the last block when their count is odd, or a half block */                  \
            int half = (b + 1) * 64 > J->Kp;                                                                 \
            prefetch_next_tile(w, row_bytes, b, NR, m0);                                                     \
            for (int r = 0; r < NR; r++) {                                                                   \
                __m256i hi, lo;                                                                              \
                load_codes(w + r * row_bytes + b * 32, half, &hi, &lo);                                      \
                const uint16_t *sr = s + r * G;                                                              \
                __m256 sv = bpg ? _mm256_set1_ps(bf16_to_f32(sr[b >> gshift])) : scale_pair(sr, 2 * b, half);    \
                for (int i = 0; i < MT; i++) {                                                               \
                    __m256 d = _mm256_mul_ps(sv, _mm256_loadu_ps(dxv + i * nb * 8 + b * 8));                 \
                    acc[r][i] = _mm256_fmadd_ps(block_dot_q8(hi, lo, xq + i * nb * 64 + b * 64), d,          \
                                                acc[r][i]);                                                  \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < NR; r++) {                                                                       \
            float zt[M_TILE];                                                                                \
            zero_terms(J, n + r, m0, MT, zt);                                                                \
            for (int i = 0; i < MT; i++) J->y[(m0 + i) * J->ldy + n + r] = hsum256(acc[r][i]) + zt[i];       \
        }                                                                                                    \
    }

/* rows_q8_of's tiling (int4 weights) on a 512-bit tile function. */
#define DEFINE_ROWS512(NAME, TILE, TARGET)                                                                   \
    static TARGET void NAME(const job_t *J, int64_t n0, int64_t n1) {                                        \
        int64_t n = n0;                                                                                      \
        if (J->M == 1) {                                                                                     \
            for (; n + Q8_NR1 <= n1; n += Q8_NR1) TILE(J, n, Q8_NR1, 0, 1);                                  \
            for (; n < n1; n++) TILE(J, n, 1, 0, 1);                                                         \
            return;                                                                                          \
        }                                                                                                    \
        for (; n + Q8_NR <= n1; n += Q8_NR) {                                                                \
            int64_t m0 = 0;                                                                                  \
            for (; m0 + Q8_MT <= J->M; m0 += Q8_MT) TILE(J, n, Q8_NR, m0, Q8_MT);                            \
            switch (J->M - m0) {                                                                             \
                case 1: TILE(J, n, Q8_NR, m0, 1); break;                                                     \
                case 2: TILE(J, n, Q8_NR, m0, 2); break;                                                     \
                case 3: TILE(J, n, Q8_NR, m0, 3); break;                                                     \
                default: break;                                                                              \
            }                                                                                                \
        }                                                                                                    \
        for (; n < n1; n++) {                                                                                \
            int64_t m0 = 0;                                                                                  \
            for (; m0 + Q8_MT <= J->M; m0 += Q8_MT) TILE(J, n, 1, m0, Q8_MT);                                \
            switch (J->M - m0) {                                                                             \
                case 1: TILE(J, n, 1, m0, 1); break;                                                         \
                case 2: TILE(J, n, 1, m0, 2); break;                                                         \
                case 3: TILE(J, n, 1, m0, 3); break;                                                         \
                default: break;                                                                              \
            }                                                                                                \
        }                                                                                                    \
    }

/* The AVX2 tile with vpdpbusd on 256 bits (AVX512VL + VNNI): where 512-bit ops are split in
 * two (Zen 4), the same work in fewer instructions than on 512 bits with their inserts. */
#define DEFINE_TILE256_VNNI(NAME, TARGET)                                                                   \
    static inline __attribute__((always_inline)) TARGET void NAME(const job_t *J, int64_t n, const int NR,     \
                                                                  int64_t m0, const int MT) {                 \
        const int64_t nb = J->nb, G = J->G, row_bytes = J->Kp / 2;                                           \
        const int64_t bpg = J->g / 64;                                                                       \
        const int gshift = bpg == 4 ? 2 : bpg == 2 ? 1 : 0;                                                 \
        const uint8_t *w = J->qweight + n * row_bytes;                                                       \
        const uint16_t *s = J->scales + n * G;                                                               \
        const int8_t *xq = J->xq + m0 * nb * 64;                                                             \
        const float *dxv = J->dxv + m0 * nb * 8;                                                             \
        __m256 acc[4][4];                                                                                    \
        for (int r = 0; r < NR; r++)                                                                         \
            for (int i = 0; i < MT; i++) acc[r][i] = _mm256_setzero_ps();                                   \
        for (int64_t b = 0; b < nb; b++) {                                                                   \
            int half = (b + 1) * 64 > J->Kp;                                                                 \
            prefetch_next_tile(w, row_bytes, b, NR, m0);                                                     \
            for (int r = 0; r < NR; r++) {                                                                   \
                __m256i hi, lo;                                                                              \
                load_codes(w + r * row_bytes + b * 32, half, &hi, &lo);                                      \
                const uint16_t *sr = s + r * G;                                                              \
                __m256 sv = bpg ? _mm256_set1_ps(bf16_to_f32(sr[b >> gshift])) : scale_pair(sr, 2 * b, half);    \
                for (int i = 0; i < MT; i++) {                                                               \
                    const int8_t *xb = xq + i * nb * 64 + b * 64;                                            \
                    __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi,                            \
                                                      _mm256_loadu_si256((const __m256i *)xb));              \
                    dot = _mm256_dpbusd_epi32(dot, lo, _mm256_loadu_si256((const __m256i *)(xb + 32)));      \
                    __m256 d = _mm256_mul_ps(sv, _mm256_loadu_ps(dxv + i * nb * 8 + b * 8));                 \
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[r][i]);                      \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < NR; r++) {                                                                       \
            float zt[M_TILE];                                                                                \
            zero_terms(J, n + r, m0, MT, zt);                                                                \
            for (int i = 0; i < MT; i++) J->y[(m0 + i) * J->ldy + n + r] = hsum256(acc[r][i]) + zt[i];       \
        }                                                                                                    \
    }

DEFINE_TILE256_VNNI(tile_q8_vnni256, AVX512_VNNI_TARGET)
DEFINE_ROWS512(rows_q8_vnni256, tile_q8_vnni256, AVX512_VNNI_TARGET)
DEFINE_TILE512(tile_q8_avx512, AVX512_TARGET, 0)
DEFINE_TILE512(tile_q8_avx512_vnni, AVX512_VNNI_TARGET, 1)
DEFINE_ROWS512(rows_q8_avx512, tile_q8_avx512, AVX512_TARGET)
DEFINE_ROWS512(rows_q8_avx512_vnni, tile_q8_avx512_vnni, AVX512_VNNI_TARGET)
#endif /* __GNUC__ || __clang__ */

#endif /* INT4_SIMD */

/* Portable reference: float, x in its natural order. */
static void rows_scalar(const job_t *J, int64_t n0, int64_t n1) {
    const int64_t half = J->Kp / 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qweight + n * half;
        const uint16_t *s = J->scales + n * J->G, *z = J->zeros + n * J->G;
        for (int64_t m = 0; m < J->M; m++) {
            const float *x = J->x + m * J->Kp;
            float total = 0.0f;
            for (int64_t gi = 0; gi < J->G; gi++) {
                float acc = 0.0f, xs = 0.0f;
                for (int64_t k = gi * J->g; k < (gi + 1) * J->g; k += 2) {
                    uint8_t byte = w[k / 2];
                    acc += (float)(byte >> 4) * x[k] + (float)(byte & 0x0F) * x[k + 1];
                    xs += x[k] + x[k + 1];
                }
                float scale = bf16_to_f32(s[gi]), zero = bf16_to_f32(z[gi]);
                total += scale * acc + (zero - 8.0f * scale) * xs;
            }
            J->y[m * J->ldy + n] = total;
        }
    }
}

/* Portable reference for code-book weights: float, the exact code book. */
static void rows_scalar_cb(const job_t *J, int64_t n0, int64_t n1) {
    const int64_t half = J->Kp / 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qweight + n * half;
        for (int64_t m = 0; m < J->M; m++) {
            const float *x = J->x + m * J->Kp;
            float total = 0.0f;
            for (int64_t gi = 0; gi < J->G; gi++) {
                float acc = 0.0f;
                for (int64_t k = gi * J->g; k < (gi + 1) * J->g; k += 2) {
                    uint8_t byte = w[k / 2];
                    acc += J->quant_map[byte >> 4] * x[k] + J->quant_map[byte & 0x0F] * x[k + 1];
                }
                total += cb_absmax(J, n, gi) * acc;
            }
            J->y[m * J->ldy + n] = total;
        }
    }
}

/* Instruction sets of the int4 Q8 path (int4_native_isa). */
#define ISA_AVX2 1
#define ISA_AVX512 2
#define ISA_AVX512_VNNI 3

static int isa_supported(void) {
#if defined(INT4_SIMD) && defined(INT4_AVX512)
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512 && __builtin_cpu_supports("avx512vnni")) return ISA_AVX512_VNNI;
    if (avx512) return ISA_AVX512;
#endif
#ifdef INT4_SIMD
    return ISA_AVX2;
#else
    return 0;
#endif
}

static atomic_int isa_selected = -1; /* -1: not chosen yet */

/* The instruction set of the int4 Q8 path: the best this CPU supports (read from it), or at
 * most `wanted` (>= 0; tests and benchmarks compare the paths); -1 leaves the choice as it is.
 * Returns the one in effect: 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 with VNNI. */
int int4_native_isa(int wanted) {
    int best = isa_supported();
    int now = atomic_load(&isa_selected);
    if (wanted >= 0) now = wanted < best ? wanted : best;
    else if (now < 0) now = best;
    atomic_store(&isa_selected, now);
    return now;
}

static void run_rows(const job_t *J, int64_t n0, int64_t n1) {
#ifdef INT4_SIMD
    if (J->variant == INT4_VARIANT_Q8) {
#ifdef INT4_AVX512
        /* Measured on Zen 4 (which splits 512-bit ops in two), per core, int4 g64 in cache:
         * batch 1 on 512 bits with VNNI 10% faster than AVX2, on 512 bits without VNNI the
         * same; batch 8 on 256 bits with VNNI 16% faster, on 512 bits 0-12% slower. */
        if (!J->codebook && J->isa == ISA_AVX512_VNNI) {
            if (J->M == 1)
                rows_q8_avx512_vnni(J, n0, n1);
            else
                rows_q8_vnni256(J, n0, n1);
            return;
        }
        if (!J->codebook && J->isa == ISA_AVX512 && J->M == 1) {
            rows_q8_avx512(J, n0, n1);
            return;
        }
#endif
        rows_q8(J, n0, n1);
        return;
    }
    if (J->variant == INT4_VARIANT_F32) {
        rows_f32(J, n0, n1);
        return;
    }
#endif
    if (J->codebook)
        rows_scalar_cb(J, n0, n1);
    else
        rows_scalar(J, n0, n1);
}

/* The weights of one call: up to MAX_SETS matrices with the same Kp and group size (w1 and w3
 * of an expert, q, k and v of an attention layer) whose outputs lie side by side in y, so that
 * x is prepared once and the thread pool woken once for all of them. */
#define MAX_SETS 4
typedef struct {
    job_t *sets[MAX_SETS];
    int nsets;
    int64_t first_item[MAX_SETS + 1]; /* work items of set s: first_item[s] .. first_item[s + 1] - 1 */
    atomic_llong next;                /* next work item to take */
} dispatch_t;

/* Work item `item` (< first_item[nsets]) of D: one chunk of one set's rows. */
static void run_dispatch_item(const dispatch_t *D, int64_t item) {
    int s = 0;
    while (item >= D->first_item[s + 1]) s++;
    const job_t *J = D->sets[s];
    int64_t n0 = (item - D->first_item[s]) * J->chunk;
    run_rows(J, n0, n0 + J->chunk < J->N ? n0 + J->chunk : J->N);
}

/* Each thread takes chunks of contiguous rows until none is left: on a busy machine a thread
 * that gets its core late (or never) does less, instead of holding up the whole call. */
static void run_range(void *arg, int index, int count) {
    dispatch_t *D = (dispatch_t *)arg;
    (void)index;
    (void)count;
    for (;;) {
        int64_t item = (int64_t)atomic_fetch_add_explicit(&D->next, 1, memory_order_relaxed);
        if (item >= D->first_item[D->nsets]) return;
        run_dispatch_item(D, item);
    }
}

/* Waits until *counter >= target (acquire): what the other threads of a call publish. Spins a
 * little, then yields the core, so a thread waiting on one whose core is busy elsewhere lets it run. */
static void wait_for_count(atomic_llong *counter, long long target) {
    for (int spins = 0; atomic_load_explicit(counter, memory_order_acquire) < target; spins++)
        pause_or_yield(spins);
}

/* ------------------------------------------------------------------------------------------- */
/* Exports                                                                                     */
/* ------------------------------------------------------------------------------------------- */

/* 1 when the AVX2 kernels were compiled and this CPU runs them. */
int int4_native_has_avx2(void) {
#if defined(INT4_SIMD) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(INT4_SIMD)
    return 1;
#else
    return 0;
#endif
}

/* 0 when the arguments are valid (the shapes the Python side checks, repeated for safety). */
static int check_args(int64_t M, int64_t N, int64_t Kp, int64_t group_size) {
    if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256) return INT4_EBADARG;
    if (M < 0 || N < 0 || Kp <= 0 || Kp % group_size != 0) return INT4_EBADARG;
    return INT4_OK;
}

#ifdef INT4_SIMD
/* The three parts of J's prepared x, in bytes rounded to 64: group sums, activations, corrections. */
static void prepared_parts(const job_t *J, size_t parts[3]) {
    const size_t M = (size_t)J->M, nb = (size_t)J->nb;
    const int q8 = J->variant == INT4_VARIANT_Q8;
    parts[0] = M * J->G * sizeof(float) * (q8 ? 2 : 1);
    parts[1] = q8 ? M * nb * 64 + M * nb * 8 * sizeof(float) : M * nb * 64 * sizeof(float);
    parts[2] = J->codebook ? M * nb * 8 * sizeof(int32_t) : 0;
    for (int i = 0; i < 3; i++) parts[i] = (parts[i] + 63) / 64 * 64;
}
#endif

/* The scratch bytes J's prepared x takes (Q8: int8 codes, scales and group sums; F32: permuted
 * floats), with J->G and J->nb set; 0 without the vector kernels, which read x as it is. */
static size_t prepared_bytes(job_t *J) {
    J->G = J->Kp / J->g;
    J->nb = (J->Kp + 63) / 64;
#ifdef INT4_SIMD
    size_t parts[3];
    prepared_parts(J, parts);
    return parts[0] + parts[1] + parts[2];
#else
    return 0;
#endif
}

/* Points J's prepared-x arrays into p (prepared_bytes(J) bytes, 64-byte aligned). Without the
 * vector kernels J->variant becomes -1: the portable loop. */
static void place_prepared(job_t *J, char *p) {
#ifdef INT4_SIMD
    size_t parts[3];
    prepared_parts(J, parts);
    J->xsum = (float *)p;
    J->xqsum = J->variant == INT4_VARIANT_Q8 ? J->xsum + (size_t)J->M * J->G : J->xsum;
    p += parts[0];
    if (J->variant == INT4_VARIANT_Q8) {
        J->dxv = (float *)p;
        J->xq = (int8_t *)(p + (size_t)J->M * J->nb * 8 * sizeof(float));
    } else {
        J->xp = (float *)p;
    }
    if (J->codebook) J->xcorr = (int32_t *)(p + parts[1]);
#else
    (void)p;
    J->variant = -1;
#endif
}

/* S computes from J's prepared x (another weight of the same call). */
static void share_prepared(job_t *S, const job_t *J) {
    S->M = J->M, S->Kp = J->Kp, S->g = J->g, S->G = J->G, S->nb = J->nb, S->variant = J->variant;
    S->xq = J->xq, S->dxv = J->dxv, S->xp = J->xp, S->xsum = J->xsum, S->xqsum = J->xqsum;
    S->x = J->x, S->xcorr = J->xcorr;
}

/* Prepares every row of J's x into its placed arrays (nothing for the portable loop). */
static void prepare_rows(const job_t *J) {
#ifdef INT4_SIMD
    for (int64_t m = 0; m < J->M; m++) prepare_row(J, m);
#else
    (void)J;
#endif
}

/* Prepares x once, then runs the rows of every set's W on the thread pool. Each set holds its
 * weights, N and y (offset to its first output column); the first's x, M, Kp, g and variant are
 * everyone's; the rest is set here. */
static int run_jobs(job_t *sets, int nsets, int n_threads) {
    job_t *J = &sets[0];
    int64_t N = 0;
    for (int s = 0; s < nsets; s++) N += sets[s].N;
    const int64_t M = J->M, Kp = J->Kp;
    size_t bytes = prepared_bytes(J);
    void *scratch = NULL;
    if (bytes) {
        scratch = aligned_alloc(64, bytes);
        if (!scratch) return INT4_ENOMEM;
    }
    place_prepared(J, (char *)scratch);
    prepare_rows(J);
    int64_t threads = n_threads < 1 ? 1 : n_threads;
    int64_t by_work = (N * Kp * (M < 4 ? M : 4)) / MIN_WEIGHTS_PER_THREAD;
    if (threads > by_work) threads = by_work < 1 ? 1 : by_work;
    if (threads > N) threads = N;
    /* ~16 chunks per thread, a multiple of the row tile, at least 16 rows. */
    int64_t chunk = (N + threads * 16 - 1) / (threads * 16);
    int isa = int4_native_isa(-1);
    chunk = chunk < 16 ? 16 : (chunk + 7) / 8 * 8;
    dispatch_t D = {.nsets = nsets};
    for (int s = 0; s < nsets; s++) {
        job_t *S = &sets[s];
        if (s > 0) share_prepared(S, J);
        S->isa = isa;
        S->chunk = chunk;
        D.sets[s] = S;
        D.first_item[s + 1] = D.first_item[s] + (S->N + chunk - 1) / chunk;
    }
    atomic_init(&D.next, 0);
    run_parallel(run_range, &D, (int)threads);
    free(scratch);
    return INT4_OK;
}

static int run_job(job_t *J, int n_threads) { return run_jobs(J, 1, n_threads); }


int int4_linear_f32_variant(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros,
                            const float *x, float *y, int64_t M, int64_t N, int64_t Kp, int64_t group_size,
                            int n_threads, int variant) {
    int rc = check_args(M, N, Kp, group_size);
    if (rc != INT4_OK) return rc;
    if (variant != INT4_VARIANT_Q8 && variant != INT4_VARIANT_F32) return INT4_EBADARG;
    if (M == 0 || N == 0) return INT4_OK;
    if (!qweight || !scales || !zeros || !x || !y) return INT4_EBADARG;
    job_t J = {.qweight = qweight, .scales = scales, .zeros = zeros, .x = x, .y = y,
               .M = M, .N = N, .Kp = Kp, .g = group_size, .ldy = N, .variant = variant};
    return run_job(&J, n_threads);
}

/* y [M, N_0 + ... + N_{nsets-1}] = x [M, Kp] @ [W_0; ...; W_{nsets-1}]^T in one call: each W_s
 * (rows[s] x Kp, stored as qweights[s], scales[s], zeros[s]) writes its own columns of y, and x is
 * prepared once. Every output equals what int4_linear_f32_variant gives for its W_s alone. */
int int4_linear_multi(int nsets, const uint8_t *const *qweights, const uint16_t *const *scales,
                      const uint16_t *const *zeros, const int64_t *rows, const float *x, float *y,
                      int64_t M, int64_t Kp, int64_t group_size, int n_threads, int variant) {
    if (nsets < 1 || nsets > MAX_SETS || !qweights || !scales || !zeros || !rows) return INT4_EBADARG;
    if (variant != INT4_VARIANT_Q8 && variant != INT4_VARIANT_F32) return INT4_EBADARG;
    int64_t N = 0;
    for (int s = 0; s < nsets; s++) {
        if (rows[s] < 0) return INT4_EBADARG;
        N += rows[s];
    }
    int rc = check_args(M, N, Kp, group_size);
    if (rc != INT4_OK) return rc;
    if (M == 0 || N == 0) return INT4_OK;
    if (!x || !y) return INT4_EBADARG;
    job_t sets[MAX_SETS];
    int used = 0;
    int64_t column = 0;
    for (int s = 0; s < nsets; s++) {
        if (rows[s] == 0) continue;
        if (!qweights[s] || !scales[s] || !zeros[s]) return INT4_EBADARG;
        memset(&sets[used], 0, sizeof sets[used]);
        sets[used].qweight = qweights[s], sets[used].scales = scales[s], sets[used].zeros = zeros[s];
        sets[used].x = x, sets[used].y = y + column, sets[used].M = M, sets[used].N = rows[s];
        sets[used].Kp = Kp, sets[used].g = group_size, sets[used].ldy = N, sets[used].variant = variant;
        column += rows[s];
        used++;
    }
    return run_jobs(sets, used, n_threads);
}

/* y [M, N] = x [M, K] @ W^T for 4-bit code-book weights in bitsandbytes' layout (nf4, fp4):
 * codes [N * K / 2] (the first of two values in the high nibble), W[n, k] =
 * quant_map[code] * absmax[(n * K + k) / blocksize]. absmax is float32 [N * K / blocksize], or
 * NULL with double quantization: absmax_q (uint8) through nested_map [256], times
 * nested_absmax [one per 256 blocks], plus absmax_offset. K a multiple of 32 and of blocksize
 * (a power of two, 32..4096), so that no block spans two rows. */
int cb4_linear_f32(const uint8_t *codes, const float *absmax, const uint8_t *absmax_q,
                   const float *nested_absmax, const float *nested_map, float absmax_offset,
                   const float *quant_map, const float *x, float *y, int64_t M, int64_t N, int64_t K,
                   int64_t blocksize, int n_threads) {
    if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0) return INT4_EBADARG;
    if (M < 0 || N < 0 || K <= 0 || K % blocksize != 0 || K % 32 != 0) return INT4_EBADARG;
    if (M == 0 || N == 0) return INT4_OK;
    if (!codes || !quant_map || !x || !y) return INT4_EBADARG;
    if (!absmax && (!absmax_q || !nested_absmax || !nested_map)) return INT4_EBADARG;
    job_t J = {.qweight = codes, .x = x, .y = y, .M = M, .N = N, .Kp = K, .g = blocksize, .ldy = N,
               .variant = INT4_VARIANT_Q8, .codebook = 1, .quant_map = quant_map, .absmax = absmax,
               .absmax_q = absmax_q, .nested_absmax = nested_absmax, .nested_map = nested_map,
               .absmax_offset = absmax_offset};
    float qmax = 0.0f;
    for (int c = 0; c < 16; c++) qmax = fabsf(quant_map[c]) > qmax ? fabsf(quant_map[c]) : qmax;
    if (!(qmax > 0.0f) || !isfinite(qmax)) return INT4_EBADARG;
    for (int c = 0; c < 16; c++) J.lut[c] = (int8_t)(64 + lrintf(63.0f * quant_map[c] / qmax));
    J.out_scale = qmax / 63.0f;
    return run_job(&J, n_threads);
}

int int4_linear_f32(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, const float *x,
                    float *y, int64_t M, int64_t N, int64_t Kp, int64_t group_size, int n_threads) {
    return int4_linear_f32_variant(qweight, scales, zeros, x, y, M, N, Kp, group_size, n_threads,
                                   INT4_VARIANT_Q8);
}

/* The int8 lm_head kernel (q8_linear_f32), sharing the thread pool above. */
#include "q8_gemv.c"
#include "attention.c"
/* A layer's attention half for one token (int4_attention_block_f32). */
#include "attention_block.c"
/* One token through a layer's chosen experts (int4_moe_f32). */
#include "moe.c"
/* Every layer of a resident model for one decode token (int4_decode_stack_f32). */
#include "decode_stack.c"
