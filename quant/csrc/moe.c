/* One token through a layer's chosen experts in one call:
 *   out = residual + sum_e weight_e * W2_e (silu(W1_e x) * W3_e x)   (residual optional).
 *
 * Included at the end of int4_gemv.c (after attention.c, whose vector e^x it uses), so that it
 * shares the thread pool, the row kernels and the prepared-x layout; not compiled on its own.
 *
 * Why: at decode time an expert was 2 kernel calls (w1|w3, then w2) and 4 ops between them
 * (chunk, silu, product, the routing weight's product), each a dispatch with its own wake of
 * the pool; at small widths those cost more than the weights take to read. Here the pool wakes
 * once for all of a token's experts, and the steps run as one queue of work items:
 *
 *   items 0 .. n*c1-1   expert e = item / c1: rows of W1_e and W3_e, then h_e = silu(g) * u on
 *                       them; whoever finishes expert e's last item prepares h_e for W2_e (its
 *                       int8 codes) and marks it ready;
 *   the rest            rows of the output: once every h_e is ready, each expert's rows of W2_e,
 *                       then their weighted sum, in the experts' order.
 *
 * Items are taken in order, so an output item starts only when every gate item has been taken
 * by a thread that is running it: the wait for "ready" always ends (a thread whose core is busy
 * elsewhere makes the others yield, not deadlock).
 *
 * Bits: each row of W1, W3 and W2 is computed by the same row kernel as int4_linear_f32, so
 * whatever the thread count or chunking the result is the same; the sum is acc = d_0 * w_0, then
 * acc = acc + d_e * w_e, each product and sum rounded to float32 (the build's -std=c11 does not
 * contract them into FMAs): what a single-expert call per expert, summed by torch in float32,
 * gives. silu is h = g / (1 + e^-g) with the vector e^x (~1 ulp): not ATen's bits.
 */

#define MOE_MAX_EXPERTS 8

typedef struct {
    job_t gate[MOE_MAX_EXPERTS], up[MOE_MAX_EXPERTS], down[MOE_MAX_EXPERTS];
    float *g, *u;      /* [n][I]: W1_e x and W3_e x */
    float *h;          /* [n][Kp2]: silu(g) * u, zero past I */
    float *d;          /* [n][D]: W2_e h_e */
    const float *weights, *residual; /* residual: NULL, or added to the sum last */
    float *out;
    int64_t n, I, Kp2, D;
    int64_t gate_chunk, gate_items, out_chunk, items;
    atomic_llong next;
    atomic_llong gate_done[MOE_MAX_EXPERTS];
    atomic_llong ready; /* experts whose h is prepared */
} moe_job_t;

/* h[i] = silu(g[i]) * u[i] for i in [r0, r1), r0 a multiple of 8: the same per position whatever
 * the chunking (vector over whole 8s, scalar past the last one). */
static void moe_silu_mul(const float *g, const float *u, float *h, int64_t r0, int64_t r1, int64_t I) {
    int64_t r = r0;
#ifdef INT4_SIMD
    const int64_t vec_end = I / 8 * 8 < r1 ? I / 8 * 8 : r1;
    for (; r + 8 <= vec_end; r += 8) {
        __m256 gv = _mm256_loadu_ps(g + r);
        __m256 e = attn_exp(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), _mm256_set1_ps(88.0f)));
        __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(h + r, _mm256_mul_ps(s, _mm256_loadu_ps(u + r)));
    }
#endif
    for (; r < r1; r++) h[r] = g[r] / (1.0f + expf(-g[r])) * u[r];
}

static void moe_run_range(void *arg, int index, int count) {
    moe_job_t *J = (moe_job_t *)arg;
    (void)index;
    (void)count;
    for (;;) {
        int64_t item = (int64_t)atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (item >= J->items) return;
        if (item < J->gate_items) {
            const int64_t per_expert = (J->I + J->gate_chunk - 1) / J->gate_chunk;
            const int64_t e = item / per_expert;
            const int64_t r0 = (item % per_expert) * J->gate_chunk;
            const int64_t r1 = r0 + J->gate_chunk < J->I ? r0 + J->gate_chunk : J->I;
            run_rows(&J->gate[e], r0, r1);
            run_rows(&J->up[e], r0, r1);
            moe_silu_mul(J->g + e * J->I, J->u + e * J->I, J->h + e * J->Kp2, r0, r1, J->I);
            /* acq_rel: the last one sees every other item's h (one release sequence). */
            if (atomic_fetch_add_explicit(&J->gate_done[e], 1, memory_order_acq_rel) == per_expert - 1) {
                prepare_rows(&J->down[e]);
                atomic_fetch_add_explicit(&J->ready, 1, memory_order_release);
            }
            continue;
        }
        wait_for_count(&J->ready, J->n);
        const int64_t r0 = (item - J->gate_items) * J->out_chunk;
        const int64_t r1 = r0 + J->out_chunk < J->D ? r0 + J->out_chunk : J->D;
        for (int64_t e = 0; e < J->n; e++) run_rows(&J->down[e], r0, r1);
        for (int64_t r = r0; r < r1; r++) {
            float acc = J->d[r] * J->weights[0];
            for (int64_t e = 1; e < J->n; e++) {
                const float term = J->d[e * J->D + r] * J->weights[e];
                acc = acc + term;
            }
            J->out[r] = J->residual ? J->residual[r] + acc : acc;
        }
    }
}

/* Rows of a batch's silu(g) * u: items of `chunk` rows, taken from a shared counter. */
typedef struct {
    const float *gate_up; /* [M][2I]: g = the first I columns, u the rest */
    float *h;             /* [M][I] */
    int64_t M, I, chunk;
    atomic_llong next;
} silu_mul_job_t;

static void silu_mul_run_range(void *arg, int index, int count) {
    silu_mul_job_t *J = (silu_mul_job_t *)arg;
    (void)index;
    (void)count;
    for (;;) {
        const int64_t m0 = (int64_t)atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed) * J->chunk;
        if (m0 >= J->M) return;
        const int64_t m1 = m0 + J->chunk < J->M ? m0 + J->chunk : J->M;
        for (int64_t m = m0; m < m1; m++) {
            const float *g = J->gate_up + m * 2 * J->I;
            moe_silu_mul(g, g + J->I, J->h + m * J->I, 0, J->I, J->I);
        }
    }
}

/* h [M, I] = silu(g) * u of gate_up [M, 2I] (a batch through an expert's W1|W3): each row as the
 * one-token call computes it (moe_silu_mul), so a token's h has the same bits in a prefill as in
 * a decode step. Many rows are split over the pool; a few stay on the caller's thread (waking
 * a worker costs more than they take). */
int int4_silu_mul_f32(const float *gate_up, float *h, int64_t M, int64_t I, int n_threads) {
    if (M < 0 || I <= 0 || (M > 0 && (!gate_up || !h))) return INT4_EBADARG;
    if (M == 0) return INT4_OK;
    int64_t threads = n_threads < 1 ? 1 : n_threads;
    if (M * I < MIN_WEIGHTS_PER_THREAD) threads = 1;
    if (threads > M) threads = M;
    silu_mul_job_t J = {.gate_up = gate_up, .h = h, .M = M, .I = I};
    J.chunk = (M + threads * 4 - 1) / (threads * 4);
    atomic_init(&J.next, 0);
    run_parallel(silu_mul_run_range, &J, (int)threads);
    return INT4_OK;
}

/* out [D] = residual + sum over e < n of weights[e] * W2_e (silu(W1_e x) * W3_e x) for x [Kp1]
 * (one token; residual [D] or NULL for none, added last: torch's float32 `residual + sum`).
 * Expert e's weights are parts[9e .. 9e+8]: qweight, scales, zeros of W1_e [I, Kp1], of W3_e
 * [I, Kp1] and of W2_e [D, Kp2] (Kp2 >= I: W2's padded input), in the int4 layout above, all
 * with group size g. Every weight's rows are computed as int4_linear_f32 computes them. */
int int4_moe_f32(int n, const void *const *parts, const float *weights, const float *x, float *out,
                 const float *residual, int64_t I, int64_t Kp1, int64_t D, int64_t Kp2, int64_t group_size,
                 int n_threads) {
    if (n < 1 || n > MOE_MAX_EXPERTS || !parts || !weights || !x || !out) return INT4_EBADARG;
    if (I <= 0 || D <= 0 || Kp2 < I || check_args(1, I, Kp1, group_size) != INT4_OK) return INT4_EBADARG;
    if (check_args(1, D, Kp2, group_size) != INT4_OK) return INT4_EBADARG;
    for (int i = 0; i < 9 * n; i++)
        if (!parts[i]) return INT4_EBADARG;
    moe_job_t *J = calloc(1, sizeof *J);
    if (!J) return INT4_ENOMEM;
    job_t *first = &J->gate[0];
    *first = (job_t){.qweight = parts[0], .scales = parts[1], .zeros = parts[2], .x = x, .M = 1, .N = I,
                     .Kp = Kp1, .g = group_size, .ldy = I, .variant = INT4_VARIANT_Q8};
    job_t down_shape = {.M = 1, .N = D, .Kp = Kp2, .g = group_size, .ldy = D, .variant = INT4_VARIANT_Q8};
    const size_t x_bytes = prepared_bytes(first), h_bytes = prepared_bytes(&down_shape);
    const size_t floats = (size_t)n * (2 * I + Kp2 + D);
    char *scratch = aligned_alloc(64, x_bytes + n * h_bytes + (floats * sizeof(float) + 63) / 64 * 64);
    if (!scratch) {
        free(J);
        return INT4_ENOMEM;
    }
    place_prepared(first, scratch);
    prepare_rows(first);
    J->g = (float *)(scratch + x_bytes + n * h_bytes);
    J->u = J->g + n * I;
    J->h = J->u + n * I;
    J->d = J->h + n * Kp2;
    memset(J->h, 0, (size_t)n * Kp2 * sizeof(float)); /* the padding past I stays 0 */
    const int isa = int4_native_isa(-1);
    for (int e = 0; e < n; e++) {
        const void *const *p = parts + 9 * e;
        job_t *gate = &J->gate[e], *up = &J->up[e], *down = &J->down[e];
        if (e > 0) *gate = (job_t){.qweight = p[0], .scales = p[1], .zeros = p[2], .N = I, .ldy = I};
        *up = (job_t){.qweight = p[3], .scales = p[4], .zeros = p[5], .N = I, .ldy = I};
        if (e > 0) share_prepared(gate, first);
        share_prepared(up, first);
        gate->y = J->g + e * I, up->y = J->u + e * I;
        *down = down_shape;
        down->qweight = p[6], down->scales = p[7], down->zeros = p[8];
        down->x = J->h + e * Kp2, down->y = J->d + e * D;
        prepared_bytes(down);
        place_prepared(down, scratch + x_bytes + e * h_bytes);
        gate->isa = up->isa = down->isa = isa;
        atomic_init(&J->gate_done[e], 0);
    }
    /* The GEMVs' rule over all the weights read; ~16 gate items per thread, 8 output items. */
    int64_t threads = n_threads < 1 ? 1 : n_threads;
    int64_t by_work = n * (2 * I * Kp1 + D * Kp2) / MIN_WEIGHTS_PER_THREAD;
    if (threads > by_work) threads = by_work < 1 ? 1 : by_work;
    int64_t chunk = (n * I + threads * 16 - 1) / (threads * 16);
    J->gate_chunk = chunk < 16 ? 16 : (chunk + 7) / 8 * 8;
    chunk = (D + threads * 8 - 1) / (threads * 8);
    J->out_chunk = chunk < 16 ? 16 : (chunk + 7) / 8 * 8;
    J->gate_items = n * ((I + J->gate_chunk - 1) / J->gate_chunk);
    J->items = J->gate_items + (D + J->out_chunk - 1) / J->out_chunk;
    J->n = n, J->I = I, J->Kp2 = Kp2, J->D = D, J->weights = weights, J->out = out;
    J->residual = residual;
    atomic_init(&J->next, 0);
    atomic_init(&J->ready, 0);
    run_parallel(moe_run_range, J, (int)threads);
    free(scratch);
    free(J);
    return INT4_OK;
}
