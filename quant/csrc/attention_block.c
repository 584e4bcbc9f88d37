/* A decoder layer's attention half for one token, in one call (engine/model.py `DecoderLayer`):
 *
 *   xn = rmsnorm(x) * norm_in;  q, k, v = xn Wq^T, xn Wk^T, xn Wv^T;  rope on q and k;
 *   the cache's row `pos` = k, v;  a = attention of q over rows 0..pos;
 *   h = x + a Wo^T;  hn = rmsnorm(h) * norm_post                     -> h, hn
 *   and, given the router's weights Wr [E, D], the routing of hn:      -> logits, ids, weights
 *   logits = hn Wr^T; ids = the K largest (ties: the lower id first), in descending order;
 *   weights = softmax(logits) over those K (transformers' softmax, top-k, then renormalise)
 *
 * Included at the end of int4_gemv.c after attention.c (its score and value loops), so that it
 * shares the thread pool, the row kernels and the prepared-x layout; not compiled on its own.
 *
 * Why: at decode time this half was ~25 torch ops and 3 kernel calls per layer (two norms of 5
 * ops, rope 3 ops each for q and k, two cache writes, the views between), each a dispatch and
 * a parallel region or a pool wake; at small widths those cost more than the arithmetic. Here
 * the calling thread norms and prepares x, the pool wakes once, and the steps run as one queue
 * of work items, taken in order:
 *
 *   rows of Wq|Wk|Wv                      (as int4_linear_multi: the same rows, the same bits)
 *   one per KV head, once every row is done: rope on its k row and its G = H / KVH query heads,
 *                       the cache row written, the G queries' attention (attention.c's loops);
 *                       whoever finishes the last head prepares a for Wo (its int8 codes)
 *   rows of Wo, once a is prepared: h = x + a Wo^T there; whoever finishes the last one norms h.
 *
 * A wait is only for items already taken by running threads, so it always ends (see moe.c).
 *
 * Bits: not torch's. The norms sum squares in double; the router's dot products and softmax are
 * in double, rounded to float32 at the end (logits and weights); rope is x * cos + roll(x, Dh/2) * sin
 * with each product and the sum rounded to float32; softmax as attention.c. Per token and
 * position they do not depend on the thread count.
 *
 * Layout: weights in the int4 layout above (group size g): Wq [H*Dh, Kp], Wk and Wv [KVH*Dh, Kp],
 * Wo [D, Kpo] (Kp, Kpo: D and H*Dh padded to g); x, norm_in, norm_post, h, hn [D]; cos and sin
 * [Dh] (this position's rows, sin with its first half negated, as engine/model.py's tables);
 * k_cache, v_cache [KVH][>= pos + 1][Dh], head h at h * head_stride.
 */

#define BLOCK_MAX_EXPERTS 64

typedef struct {
    dispatch_t qkv;       /* Wq|Wk|Wv rows: items 0 .. qkv_items-1 */
    job_t qkv_sets[3], o; /* o: Wo on a */
    const float *x, *norm_post, *cos, *sin;
    float *qkv_out;       /* [H*Dh + 2*KVH*Dh] */
    float *q;             /* [H*Dh]: q after rope */
    float *a;             /* [Kpo]: attention output, zero past H*Dh */
    float *scores;        /* [H][L] */
    float *o_out;         /* [D] */
    float *k_cache, *v_cache;
    float *h, *hn;
    const float *router; /* [E][D], or NULL: no routing */
    float *logits, *route_weights;
    int32_t *ids;
    int64_t E, K;
    float eps, scale;
    int64_t D, H, KVH, Dh, L, pos, head_stride;
    int64_t qkv_items, head_items, o_chunk, items;
    atomic_llong next, qkv_done, heads_done, o_done;
} block_job_t;

/* out = x / sqrt(mean(x^2) + eps) * weight over D values, the sum of squares in double. */
static void block_rmsnorm(const float *x, const float *weight, float eps, int64_t D, float *out) {
    double squares = 0.0;
    for (int64_t i = 0; i < D; i++) squares += (double)x[i] * x[i];
    const float inv = (float)(1.0 / sqrt(squares / (double)D + (double)eps));
    for (int64_t i = 0; i < D; i++) {
        const float scaled = x[i] * inv;
        out[i] = scaled * weight[i];
    }
}

/* out = x * cos + roll(x, Dh/2) * sin over one head (Dh even). */
static void block_rope(const float *x, const float *cos, const float *sin, int64_t Dh, float *out) {
    const int64_t half = Dh / 2;
    for (int64_t i = 0; i < Dh; i++) {
        const float straight = x[i] * cos[i];
        const float rolled = x[i < half ? i + half : i - half] * sin[i];
        out[i] = straight + rolled;
    }
}

/* logits [E], the top K ids [K] in descending order and their renormalised softmax weights [K]
 * for hn [D] (see the top of this file). E dot products at once: E independent sums. */
static void block_route(const float *hn, const float *router, int64_t D, int64_t E, int64_t K, float *logits,
                        int32_t *ids, float *weights) {
    double sums[BLOCK_MAX_EXPERTS] = {0.0}, kept[BLOCK_MAX_EXPERTS];
    for (int64_t i = 0; i < D; i++)
        for (int64_t e = 0; e < E; e++) sums[e] += (double)hn[i] * router[e * D + i];
    for (int64_t e = 0; e < E; e++) logits[e] = (float)sums[e];
    unsigned char taken[BLOCK_MAX_EXPERTS] = {0};
    double total = 0.0;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || sums[e] > sums[best])) best = e;
        taken[best] = 1;
        ids[k] = (int32_t)best;
        kept[k] = exp(sums[best] - sums[ids[0]]); /* ids[0] holds the largest: e^0 = 1 */
        total += kept[k];
    }
    for (int64_t k = 0; k < K; k++) weights[k] = (float)(kept[k] / total);
}

/* KV head b: its cache row, then the attention of its G query heads. */
static void block_head(block_job_t *J, int64_t b) {
    const int64_t Dh = J->Dh, G = J->H / J->KVH;
    const float *k = J->qkv_out + J->H * Dh + b * Dh;
    const float *v = J->qkv_out + J->H * Dh + J->KVH * Dh + b * Dh;
    float *k_head = J->k_cache + b * J->head_stride, *v_head = J->v_cache + b * J->head_stride;
    block_rope(k, J->cos, J->sin, Dh, k_head + J->pos * Dh);
    memcpy(v_head + J->pos * Dh, v, (size_t)Dh * sizeof(float));
    for (int64_t g = 0; g < G; g++) {
        const int64_t head = b * G + g;
        float *q = J->q + head * Dh, *scores = J->scores + head * J->L;
        block_rope(J->qkv_out + head * Dh, J->cos, J->sin, Dh, q);
        const float sum = attn_scores(q, k_head, J->L, Dh, J->scale, scores);
        attn_values(scores, v_head, J->L, Dh, 1.0f / sum, J->a + head * Dh);
    }
}

static void block_run_range(void *arg, int index, int count) {
    block_job_t *J = (block_job_t *)arg;
    (void)index;
    (void)count;
    for (;;) {
        int64_t item = (int64_t)atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (item >= J->items) return;
        if (item < J->qkv_items) {
            run_dispatch_item(&J->qkv, item);
            atomic_fetch_add_explicit(&J->qkv_done, 1, memory_order_release);
            continue;
        }
        item -= J->qkv_items;
        if (item < J->head_items) {
            wait_for_count(&J->qkv_done, J->qkv_items);
            block_head(J, item);
            if (atomic_fetch_add_explicit(&J->heads_done, 1, memory_order_acq_rel) == J->head_items - 1) {
                prepare_rows(&J->o);
                atomic_fetch_add_explicit(&J->heads_done, 1, memory_order_release); /* a is ready */
            }
            continue;
        }
        item -= J->head_items;
        wait_for_count(&J->heads_done, J->head_items + 1);
        const int64_t r0 = item * J->o_chunk, r1 = r0 + J->o_chunk < J->D ? r0 + J->o_chunk : J->D;
        run_rows(&J->o, r0, r1);
        for (int64_t r = r0; r < r1; r++) J->h[r] = J->x[r] + J->o_out[r];
        const int64_t o_items = J->items - J->qkv_items - J->head_items;
        if (atomic_fetch_add_explicit(&J->o_done, 1, memory_order_acq_rel) == o_items - 1) {
            block_rmsnorm(J->h, J->norm_post, J->eps, J->D, J->hn);
            if (J->router) block_route(J->hn, J->router, J->D, J->E, J->K, J->logits, J->ids, J->route_weights);
        }
    }
}

/* h, hn [D] for one token x [D] at position pos (see the top of this file); parts[0..11]: the
 * qweight, scales and zeros of Wq, Wk, Wv, Wo. With router [E, D] (1 <= K <= E <=
 * BLOCK_MAX_EXPERTS; NULL for none), also logits [E], ids [K] and route_weights [K]. */
int int4_attention_block_f32(const void *const *parts, const float *x, const float *norm_in,
                             const float *norm_post, float eps, const float *cos, const float *sin,
                             float *k_cache, float *v_cache, int64_t head_stride, int64_t pos, int64_t D,
                             int64_t Kp, int64_t H, int64_t KVH, int64_t Dh, int64_t Kpo, int64_t group_size,
                             float scale, float *h, float *hn, const float *router, int64_t E, int64_t K,
                             float *logits, int32_t *ids, float *route_weights, int n_threads) {
    if (!parts || !x || !norm_in || !norm_post || !cos || !sin || !k_cache || !v_cache || !h || !hn)
        return INT4_EBADARG;
    if (router && (E < 1 || E > BLOCK_MAX_EXPERTS || K < 1 || K > E || !logits || !ids || !route_weights))
        return INT4_EBADARG;
    for (int i = 0; i < 12; i++)
        if (!parts[i]) return INT4_EBADARG;
    if (D <= 0 || Kp < D || H <= 0 || KVH <= 0 || H % KVH != 0 || Dh <= 0 || Dh % 2 != 0 || Kpo < H * Dh)
        return INT4_EBADARG;
    if (pos < 0 || head_stride < (pos + 1) * Dh) return INT4_EBADARG;
    if (check_args(1, H * Dh, Kp, group_size) != INT4_OK || check_args(1, D, Kpo, group_size) != INT4_OK)
        return INT4_EBADARG;
    block_job_t *J = calloc(1, sizeof *J);
    if (!J) return INT4_ENOMEM;
    const int64_t L = pos + 1, qkv_rows = H * Dh + 2 * KVH * Dh;
    job_t *first = &J->qkv_sets[0];
    *first = (job_t){.M = 1, .Kp = Kp, .g = group_size, .variant = INT4_VARIANT_Q8};
    J->o = (job_t){.M = 1, .N = D, .Kp = Kpo, .g = group_size, .ldy = D, .variant = INT4_VARIANT_Q8};
    const size_t x_bytes = prepared_bytes(first), a_bytes = prepared_bytes(&J->o);
    const size_t floats = (size_t)Kp + qkv_rows + H * Dh + Kpo + (size_t)H * L + D;
    char *scratch = aligned_alloc(64, x_bytes + a_bytes + (floats * sizeof(float) + 63) / 64 * 64);
    if (!scratch) {
        free(J);
        return INT4_ENOMEM;
    }
    float *xn = (float *)(scratch + x_bytes + a_bytes);
    J->qkv_out = xn + Kp;
    J->q = J->qkv_out + qkv_rows;
    J->a = J->q + H * Dh;
    J->scores = J->a + Kpo;
    J->o_out = J->scores + H * L;
    memset(xn, 0, (size_t)Kp * sizeof(float));
    memset(J->a, 0, (size_t)Kpo * sizeof(float));
    block_rmsnorm(x, norm_in, eps, D, xn);
    first->x = xn;
    place_prepared(first, scratch);
    prepare_rows(first);
    J->o.x = J->a, J->o.y = J->o_out;
    J->o.qweight = parts[9], J->o.scales = parts[10], J->o.zeros = parts[11];
    place_prepared(&J->o, scratch + x_bytes);
    /* The GEMVs' rule over the weights and the cache read. */
    int64_t threads = n_threads < 1 ? 1 : n_threads;
    int64_t by_work = (qkv_rows * Kp + D * Kpo + 2 * KVH * L * Dh) / MIN_WEIGHTS_PER_THREAD;
    if (threads > by_work) threads = by_work < 1 ? 1 : by_work;
    int64_t chunk = (qkv_rows + threads * 16 - 1) / (threads * 16);
    chunk = chunk < 16 ? 16 : (chunk + 7) / 8 * 8;
    const int isa = int4_native_isa(-1);
    const int64_t rows[3] = {H * Dh, KVH * Dh, KVH * Dh};
    int64_t column = 0;
    J->qkv.nsets = 3;
    for (int s = 0; s < 3; s++) {
        job_t *S = &J->qkv_sets[s];
        if (s > 0) share_prepared(S, first);
        S->qweight = parts[3 * s], S->scales = parts[3 * s + 1], S->zeros = parts[3 * s + 2];
        S->N = rows[s], S->ldy = qkv_rows, S->y = J->qkv_out + column;
        S->isa = isa, S->chunk = chunk;
        column += rows[s];
        J->qkv.sets[s] = S;
        J->qkv.first_item[s + 1] = J->qkv.first_item[s] + (rows[s] + chunk - 1) / chunk;
    }
    J->o.isa = isa;
    chunk = (D + threads * 8 - 1) / (threads * 8);
    J->o_chunk = chunk < 16 ? 16 : (chunk + 7) / 8 * 8;
    J->qkv_items = J->qkv.first_item[3];
    J->head_items = KVH;
    J->items = J->qkv_items + KVH + (D + J->o_chunk - 1) / J->o_chunk;
    J->x = x, J->norm_post = norm_post, J->cos = cos, J->sin = sin;
    J->k_cache = k_cache, J->v_cache = v_cache, J->h = h, J->hn = hn;
    J->router = router, J->E = E, J->K = K, J->logits = logits, J->ids = ids, J->route_weights = route_weights;
    J->eps = eps, J->scale = scale;
    J->D = D, J->H = H, J->KVH = KVH, J->Dh = Dh, J->L = L, J->pos = pos, J->head_stride = head_stride;
    atomic_init(&J->next, 0);
    atomic_init(&J->qkv_done, 0);
    atomic_init(&J->heads_done, 0);
    atomic_init(&J->o_done, 0);
    run_parallel(block_run_range, J, (int)threads);
    free(scratch);
    free(J);
    return INT4_OK;
}
