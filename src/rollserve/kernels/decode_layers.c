/* Every decoder layer of a decode step of few rows (1 to MAX_ROWS tokens, one per sequence),
 * in one call and one OpenMP team: norm, q/k/v projection, q/k norm, rotary, K/V into the
 * pool, attention, o projection, residual add and norm, gate/up projection with SwiGLU, down
 * projection, layer after layer; and, as a second call (decode_logits), the lm_head of the
 * step's rows.
 *
 * Why: at a few rows a layer's four matmuls stream its weights once and the rest is a few
 * kilobytes of arithmetic, but through PyTorch the rest costs ~15 operator and kernel calls a
 * layer of 2-15 us each, ~3 ms a token on a 0.5B model whose weights stream in ~12 ms
 * (BENCHMARKS.md, "Batch-1 decode"). Here the steps of a layer are phases of one parallel
 * region separated by barriers, and the matmuls are this file's own matrix-vector products
 * (oneDNN adds ~20 us a call at these shapes).
 *
 * Same roundings as the eager path at every step (elementwise.h, decode_attention.h): each
 * projection's output is rounded to ELEM once, after its bias. Only the summation order of
 * the dot products differs from oneDNN's.
 *
 * Compile-time model shape: HIDDEN, INTERMEDIATE, KV_HEADS, GROUP (query heads per KV head),
 * HEAD_DIM (a multiple of 16), QK_NORM (0 or 1), and ELEM as for every kernel.
 * HIDDEN, INTERMEDIATE and the query size are multiples of 32 (the dot products' step).
 *
 * Layouts (element strides, row-major, contiguous):
 *   x, residual  [n, HIDDEN]  in: the embeddings and their copy; out: the last layer's
 *                             output and the residual stream it adds to (the final norm's
 *                             inputs, as DecoderLayer.forward returns them)
 *   cos, sin     [n, HEAD_DIM]
 *   k/v_cache    [layers, KV_HEADS, pool_slots, HEAD_DIM]
 *   out_slots    [n]; kv_slots [n, max_len] (this step's token included); kv_lens [n]
 *   scratch      ELEMs for the activations (decode_layers_scratch gives the sizes)
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "decode_attention.h"
#include "elementwise.h"

#define MAX_ROWS 3 /* decode_layers.py: from 4 rows oneDNN's matmuls win over dot_rows */
#define Q_SIZE (KV_HEADS * GROUP * HEAD_DIM)
#define KV_SIZE (KV_HEADS * HEAD_DIM)
#define QKV_SIZE (Q_SIZE + 2 * KV_SIZE)
/* Output features a work item computes and stores as one vector (at most LANES). */
#define BLOCK 8
/* Partial sums kept for each (row, weight row): one chain of dot instructions would wait
 * out their latency on every chunk; UNROLL independent chains do not. */
#define UNROLL 4
_Static_assert(UNROLL == 4, "acc_sum adds four partial sums");

#if ELEM_IS_BF16 && defined(__AVX512BF16__)
#define DOT_STEP 32 /* vdpbf16ps: 32 bf16 products summed pairwise into 16 float32 lanes */
typedef __m512 acc_t;
typedef __m512bh chunk_t;
static inline chunk_t load_chunk(const ELEM *p) { return (__m512bh)_mm512_loadu_si512(p); }
static inline acc_t dot_chunk(acc_t acc, chunk_t w, chunk_t x) {
    return _mm512_dpbf16_ps(acc, w, x);
}
static inline acc_t acc_zero(void) { return _mm512_setzero_ps(); }
static inline float acc_sum(acc_t a, acc_t b, acc_t c, acc_t d) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}
#else
#define DOT_STEP LANES
typedef vfloat acc_t;
typedef vfloat chunk_t;
static inline chunk_t load_chunk(const ELEM *p) { return load_elems(p, ALL_LANES); }
static inline acc_t dot_chunk(acc_t acc, chunk_t w, chunk_t x) { return vfmadd(w, x, acc); }
static inline acc_t acc_zero(void) { return vzero(); }
static inline float acc_sum(acc_t a, acc_t b, acc_t c, acc_t d) {
    return reduce_add((a + b) + (c + d));
}
#endif

/* One layer's parameters, in the order decode_layers.py fills them. NULL: absent. */
struct LayerWeights {
    const ELEM *input_norm, *qkv, *qkv_bias, *q_norm, *k_norm, *o, *post_norm, *gate_up, *down;
};

/* dots[r][f] = x[r] . w[f] for `rows` rows of x and `count` weight rows of k values from w,
 * one weight row after another: a thread's share of a projection streams in address order.
 * (Reading eight weight rows side by side, a chunk of each in turn, batch-1 decode was 1.13x
 * slower at ~80 GB/s: BENCHMARKS.md, "Batch-1 decode: weight rows in address order".)
 * Inlined with `rows` constant: the accumulators stay in registers (MAX_ROWS x UNROLL of
 * them, a weight chunk and an x chunk: 14 of AVX2's 16), and each weight chunk loaded serves
 * every row. */
static inline __attribute__((always_inline)) void dot_tile(
    const ELEM *x, const int rows, const ELEM *w, int64_t k, int64_t count,
    float dots[MAX_ROWS][BLOCK]) {
    for (int64_t f = 0; f < count; f++) {
        const ELEM *wf = w + f * k;
        acc_t acc[MAX_ROWS][UNROLL];
        for (int r = 0; r < rows; r++)
            for (int u = 0; u < UNROLL; u++) acc[r][u] = acc_zero();
        int64_t c = 0;
        for (; c + UNROLL * DOT_STEP <= k; c += UNROLL * DOT_STEP)
            for (int u = 0; u < UNROLL; u++) {
                const chunk_t wv = load_chunk(wf + c + u * DOT_STEP);
                for (int r = 0; r < rows; r++)
                    acc[r][u] = dot_chunk(acc[r][u], wv, load_chunk(x + r * k + c + u * DOT_STEP));
            }
        for (; c < k; c += DOT_STEP) {
            const chunk_t wv = load_chunk(wf + c);
            for (int r = 0; r < rows; r++)
                acc[r][0] = dot_chunk(acc[r][0], wv, load_chunk(x + r * k + c));
        }
        for (int r = 0; r < rows; r++)
            dots[r][f] = acc_sum(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    }
}

/* dots[r][f] = x[r] . w[f] for rows r < n (1 to MAX_ROWS) and the `count` weight rows from w:
 * one pass over the weight rows whatever n is. */
_Static_assert(MAX_ROWS == 3, "dot_rows has a case for each row count");
static inline void dot_rows(const ELEM *x, int64_t n, const ELEM *w, int64_t k, int64_t count,
                            float dots[MAX_ROWS][BLOCK]) {
    switch (n) {
    case 1: dot_tile(x, 1, w, k, count, dots); break;
    case 2: dot_tile(x, 2, w, k, count, dots); break;
    default: dot_tile(x, 3, w, k, count, dots); break;
    }
}

/* out [n, features] = round(x [n, k] . w^T + bias): this thread's share of the blocks. */
static void project(const ELEM *x, int64_t n, const ELEM *w, const ELEM *bias, int64_t k,
                    int64_t features, ELEM *out) {
    float dots[MAX_ROWS][BLOCK];
#pragma omp for schedule(static)
    for (int64_t first = 0; first < features; first += BLOCK) {
        const int64_t count = features - first < BLOCK ? features - first : BLOCK;
        dot_rows(x, n, w + first * k, k, count, dots);
        const vmask m = tail_mask(count);
        const vfloat b = bias ? load_elems(bias + first, m) : vzero();
        for (int64_t r = 0; r < n; r++)
            store_elems(out + r * features + first, load_floats(dots[r], m) + b, m);
    }
}

/* act [n, INTERMEDIATE] = silu_mul of each row's gate and up halves in gate_up [n, 2 *
 * INTERMEDIATE] (the projection's output, already rounded as the eager projection rounds). */
static void swiglu(const ELEM *gate_up, int64_t n, ELEM *act) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n * INTERMEDIATE; i += LANES) {
        const int64_t r = i / INTERMEDIATE, j = i % INTERMEDIATE;
        const ELEM *gate = gate_up + r * 2 * INTERMEDIATE + j;
        store_elems(act + i, silu_mul(load_elems(gate, ALL_LANES),
                                      load_elems(gate + INTERMEDIATE, ALL_LANES)), ALL_LANES);
    }
}

/* Per row: q/k norms (QK_NORM), rotary on q and k heads, and k, v into the pool's out slot. */
static void position_and_store(ELEM *qkv, int64_t n, const struct LayerWeights *w,
                               const ELEM *cos, const ELEM *sin, const int64_t *out_slots,
                               ELEM *k_cache, ELEM *v_cache, int64_t pool_slots, float eps) {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * (KV_HEADS * GROUP + KV_HEADS); item++) {
        const int64_t r = item / (KV_HEADS * GROUP + KV_HEADS);
        const int64_t head = item % (KV_HEADS * GROUP + KV_HEADS); /* q heads, then k heads */
        ELEM *v = qkv + r * QKV_SIZE + head * HEAD_DIM;
#if QK_NORM
        rms_norm_row(v, NULL, head < KV_HEADS * GROUP ? w->q_norm : w->k_norm, v, HEAD_DIM, eps);
#else
        (void)w, (void)eps;
#endif
        rotary_head(v, cos + r * HEAD_DIM, sin + r * HEAD_DIM, HEAD_DIM);
        if (head < KV_HEADS * GROUP) continue;
        const int64_t kv_head = head - KV_HEADS * GROUP;
        const int64_t slot = (kv_head * pool_slots + out_slots[r]) * HEAD_DIM;
        memcpy(k_cache + slot, v, HEAD_DIM * sizeof(ELEM));
        memcpy(v_cache + slot, v + KV_SIZE, HEAD_DIM * sizeof(ELEM));
    }
}

/* Attention of every (row, KV head) item into attn [n, Q_SIZE]. */
static void attend(const ELEM *qkv, int64_t n, const ELEM *k_cache, const ELEM *v_cache,
                   int64_t pool_slots, const int64_t *kv_slots, int64_t max_len,
                   const int64_t *kv_lens, float scale, float *scores, ELEM *attn) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n * KV_HEADS; item++) {
        const int64_t r = item / KV_HEADS, head = item % KV_HEADS;
        const int64_t offset = head * pool_slots * HEAD_DIM;
        attend_item(qkv + r * QKV_SIZE + head * GROUP * HEAD_DIM, k_cache + offset,
                    v_cache + offset, kv_slots + r * max_len, kv_lens[r], scale, scores,
                    attn + r * Q_SIZE + head * GROUP * HEAD_DIM);
    }
}

/* Norm of every row: residual = round(residual + add) first unless add is NULL. */
static void norm_rows(const ELEM *add, ELEM *residual, const ELEM *weight, ELEM *out, int64_t n,
                      float eps) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++)
        rms_norm_row(add ? add + r * HIDDEN : residual + r * HIDDEN,
                     add ? residual + r * HIDDEN : NULL, weight, out + r * HIDDEN, HIDDEN, eps);
}

/* ELEMs of scratch decode_layers needs for n rows. */
int64_t decode_layers_scratch(int64_t n) {
    return n * (HIDDEN + QKV_SIZE + Q_SIZE + HIDDEN + 3 * INTERMEDIATE);
}

/* Runs layers [0, num_layers). Returns 0, or -1 when n is out of range or the attention's
 * scratch cannot be had (nothing is written then). */
int decode_layers(const struct LayerWeights *layers, int64_t num_layers, int64_t n, ELEM *x,
                  ELEM *residual, const ELEM *cos, const ELEM *sin, ELEM *k_cache,
                  ELEM *v_cache, int64_t pool_slots, const int64_t *out_slots,
                  const int64_t *kv_slots, int64_t max_len, const int64_t *kv_lens, float scale,
                  float eps, ELEM *scratch, int threads) {
    if (n < 1 || n > MAX_ROWS) return -1;
    const int64_t stride = (GROUP * max_len + 15) / 16 * 16; /* floats per thread, 64 B aligned */
    float *scores = aligned_alloc(64, (size_t)(threads * stride) * sizeof(float));
    if (scores == NULL) return -1;
    ELEM *normed = scratch, *qkv = normed + n * HIDDEN, *attn = qkv + n * QKV_SIZE;
    ELEM *o = attn + n * Q_SIZE, *gate_up = o + n * HIDDEN;
    ELEM *act = gate_up + 2 * n * INTERMEDIATE;
    const int64_t layer_stride = (int64_t)KV_HEADS * pool_slots * HEAD_DIM;
#pragma omp parallel num_threads(threads)
    {
        float *mine = scores + omp_get_thread_num() * stride;
        for (int64_t l = 0; l < num_layers; l++) {
            const struct LayerWeights *w = layers + l;
            ELEM *kl = k_cache + l * layer_stride, *vl = v_cache + l * layer_stride;
            norm_rows(l ? x : NULL, residual, w->input_norm, normed, n, eps);
            project(normed, n, w->qkv, w->qkv_bias, HIDDEN, QKV_SIZE, qkv);
            position_and_store(qkv, n, w, cos, sin, out_slots, kl, vl, pool_slots, eps);
            attend(qkv, n, kl, vl, pool_slots, kv_slots, max_len, kv_lens, scale, mine, attn);
            project(attn, n, w->o, NULL, Q_SIZE, HIDDEN, o);
            norm_rows(o, residual, w->post_norm, normed, n, eps);
            /* one stream of weight rows per thread: gate and up side by side read ~20% slower */
            project(normed, n, w->gate_up, NULL, HIDDEN, 2 * INTERMEDIATE, gate_up);
            swiglu(gate_up, n, act);
            project(act, n, w->down, NULL, INTERMEDIATE, HIDDEN, x);
        }
    }
    free(scores);
    return 0;
}

/* logits [n, vocab] = round(x [n, HIDDEN] . weight^T) for a step of few rows: the lm_head on
 * the layers' products. oneDNN's one-row product read a float32 weight at ~48 GB/s on AVX2
 * where these read ~73 (BENCHMARKS.md, "the lm_head of few rows"). Returns 0, or -1 when n is
 * out of range (nothing is written then). */
int decode_logits(const ELEM *x, int64_t n, const ELEM *weight, int64_t vocab, ELEM *logits,
                  int threads) {
    if (n < 1 || n > MAX_ROWS) return -1;
#pragma omp parallel num_threads(threads)
    project(x, n, weight, NULL, HIDDEN, vocab, logits);
    return 0;
}
