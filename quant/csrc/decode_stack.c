/* Every layer of a resident model for one decode token, in one call (engine/model.py
 * `Mixtral.forward` -> `Int4Kernel.decode_stack`):
 *
 *   for each layer: h, hn, its routing = the attention half (attention_block.c) of x;
 *                   x = h + the chosen experts of hn, in ascending id order (moe.c)
 *
 * Included at the end of int4_gemv.c after attention_block.c and moe.c; not compiled on its own.
 *
 * Why: at small widths a decode token spent more time in Python between the two native calls of
 * each layer (the operands' checks, the routing's lists, the ctypes calls) than in them. The
 * steps are the two calls' own functions with the arguments the per-layer path gives them, so
 * the bits are that path's.
 *
 * Layout: layer l's pointers are parts[l * P ..], P = 17 + 9 E: the 12 attention weight parts
 * (qweight, scales, zeros of Wq, Wk, Wv, Wo), norm_in, norm_post, the cache's k and v, the
 * router [E][D], then expert e's 9 parts (W1, W3, W2) at 17 + 9 e.
 */

#define STACK_FIXED_PARTS 17

static void stack_sort_by_id(int32_t *ids, float *weights, int64_t K) {
    for (int64_t i = 1; i < K; i++)
        for (int64_t j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
            const int32_t id = ids[j];
            const float w = weights[j];
            ids[j] = ids[j - 1], weights[j] = weights[j - 1];
            ids[j - 1] = id, weights[j - 1] = w;
        }
}

/* out [D] = the stack's output for x [D] at position pos (see the top of this file). */
int int4_decode_stack_f32(int64_t n_layers, const void *const *parts, const float *x, float eps, const float *cos,
                          const float *sin, int64_t head_stride, int64_t pos, int64_t D, int64_t Kp, int64_t H,
                          int64_t KVH, int64_t Dh, int64_t Kpo, int64_t group_size, float scale, int64_t E,
                          int64_t K, int64_t I, int64_t Kp1, int64_t Kp2, float *out, int n_threads) {
    if (n_layers < 1 || !parts || !x || !out || E < 1 || E > BLOCK_MAX_EXPERTS || K < 1 || K > E ||
        K > MOE_MAX_EXPERTS || Kp1 < D)
        return INT4_EBADARG;
    const int64_t P = STACK_FIXED_PARTS + 9 * E;
    /* h, the stream between layers, hn zero past D (the experts' padded input), logits. */
    float *scratch = calloc((size_t)(3 * D + Kp1 + E), sizeof(float));
    if (!scratch) return INT4_ENOMEM;
    float *h = scratch, *stream = h + D, *next = stream + D, *hn = next + D, *logits = hn + Kp1;
    int32_t ids[MOE_MAX_EXPERTS];
    float weights[MOE_MAX_EXPERTS];
    const void *chosen[9 * MOE_MAX_EXPERTS];
    memcpy(stream, x, (size_t)D * sizeof(float));
    atomic_fetch_add(&pool_hot, 1); /* 2 calls a layer: the workers wait awake between them */
    int rc = INT4_OK;
    for (int64_t l = 0; l < n_layers && rc == INT4_OK; l++) {
        const void *const *p = parts + l * P;
        rc = int4_attention_block_f32(p, stream, p[12], p[13], eps, cos, sin, (float *)p[14], (float *)p[15],
                                      head_stride, pos, D, Kp, H, KVH, Dh, Kpo, group_size, scale, h, hn, p[16],
                                      E, K, logits, ids, weights, n_threads);
        if (rc != INT4_OK) break;
        stack_sort_by_id(ids, weights, K);
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < 9; j++) chosen[9 * k + j] = p[STACK_FIXED_PARTS + 9 * ids[k] + j];
        float *target = l == n_layers - 1 ? out : next;
        rc = int4_moe_f32((int)K, chosen, weights, hn, target, h, I, Kp1, D, Kp2, group_size, n_threads);
        float *swap = stream;
        stream = next, next = swap;
    }
    atomic_fetch_sub(&pool_hot, 1);
    free(scratch);
    return rc;
}
