/* Decode attention on CPU (AVX-512 or AVX2, see simd.h): one query token per sequence against
 * that sequence's K/V rows, read in place from the KV pool through the slot table. This
 * header holds one work item's attention (`attend_item`); decode_attention.c runs a batch of
 * items, decode_layers.c runs them inside a whole decoder layer.
 *
 * The PyTorch path gathers every sequence's K/V rows into a padded copy and runs two batched
 * matmuls over it, which moves the cached K/V through memory three or four times. This kernel
 * reads each K and V row once, keeps scores in a per-thread scratch buffer and accumulates
 * the output in float32 registers.
 *
 * Compiled at run time for one model: HEAD_DIM (a multiple of 16), GROUP (query heads per KV
 * head) and ELEM (uint16_t for bfloat16 storage, float for float32) are compile-time
 * constants, so the loops over heads and LANES-wide chunks unroll and the accumulators stay
 * in registers.
 *
 * Layouts (element strides, all row-major and contiguous):
 *   q, out     [n, kv_heads * GROUP, HEAD_DIM]
 *   k, v       [kv_heads, pool_slots, HEAD_DIM]   (one layer of the pool)
 *   kv_slots   [n, max_len]                       (int64 pool slots, position order)
 *   kv_lens    [n]                                (int64, 1 <= kv_lens[i] <= max_len)
 * Work items are (sequence, kv head) pairs; each writes GROUP rows of `out` that no other item
 * touches, so items run in parallel without synchronisation.
 */
#ifndef ROLLSERVE_DECODE_ATTENTION_H
#define ROLLSERVE_DECODE_ATTENTION_H

#include "simd.h"

#define CHUNKS (HEAD_DIM / LANES)
/* K/V rows are requested this many rows ahead of use. Rows follow the slot table, not
 * addresses, so the hardware prefetcher misses them; without this each item stalls on DRAM
 * and then computes, serially (35% more time per layer at 43-128 sequences, cold caches). */
#define PREFETCH_ROWS 16
#define ROW_BYTES (HEAD_DIM * (int)sizeof(ELEM))

static inline void prefetch_row(const ELEM *row) {
    for (int offset = 0; offset < ROW_BYTES; offset += 64)
        _mm_prefetch((const char *)row + offset, _MM_HINT_T0);
}
/* Query heads whose output accumulators (CHUNKS registers each) are live at once: all the
 * registers but a few for the V chunk, the broadcast probability and addresses. */
#define ACCUMULATORS (VREGS - 4)
#define HEAD_BLOCK (GROUP * CHUNKS <= ACCUMULATORS ? GROUP \
                    : (ACCUMULATORS / CHUNKS > 0 ? ACCUMULATORS / CHUNKS : 1))

/* scores[h * len + t] = scale * q_h . k_t for the GROUP heads of one item. */
#if GROUP >= 4
/* Many heads share each K row: transpose blocks of LANES rows so that LANES tokens' scores
 * build up in one register per head with plain FMAs (no horizontal sum per score). */
static void item_scores(const ELEM *q, const ELEM *k, const int64_t *slots, int64_t len,
                        float scale, float *scores) {
    float qf[GROUP][HEAD_DIM] __attribute__((aligned(64)));
    for (int h = 0; h < GROUP; h++)
        for (int c = 0; c < CHUNKS; c++)
            store_floats(&qf[h][c * LANES],
                         load_elems(q + h * HEAD_DIM + c * LANES, ALL_LANES) * vset1(scale),
                         ALL_LANES);
    for (int64_t first = 0; first < len; first += LANES) {
        const int count = len - first < LANES ? (int)(len - first) : LANES;
        const ELEM *rows[LANES];
        for (int j = 0; j < LANES; j++) /* lanes past the end reread row 0; never stored */
            rows[j] = k + slots[first + (j < count ? j : 0)] * HEAD_DIM;
        for (int64_t t = first + PREFETCH_ROWS; t < first + PREFETCH_ROWS + LANES && t < len; t++)
            prefetch_row(k + slots[t] * HEAD_DIM);
        vfloat acc[GROUP];
        for (int h = 0; h < GROUP; h++) acc[h] = vzero();
        for (int c = 0; c < CHUNKS; c++) {
            vfloat block[LANES];
            for (int j = 0; j < LANES; j++) block[j] = load_elems(rows[j] + c * LANES, ALL_LANES);
            transpose_block(block);
            for (int h = 0; h < GROUP; h++)
                for (int d = 0; d < LANES; d++)
                    acc[h] = vfmadd(vset1(qf[h][c * LANES + d]), block[d], acc[h]);
        }
        const vmask mask = tail_mask(count);
        for (int h = 0; h < GROUP; h++) store_floats(scores + h * len + first, acc[h], mask);
    }
}
#else
static void item_scores(const ELEM *q, const ELEM *k, const int64_t *slots, int64_t len,
                        float scale, float *scores) {
    vfloat qf[GROUP][CHUNKS];
    for (int h = 0; h < GROUP; h++)
        for (int c = 0; c < CHUNKS; c++)
            qf[h][c] = load_elems(q + h * HEAD_DIM + c * LANES, ALL_LANES) * vset1(scale);
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_ROWS < len) prefetch_row(k + slots[t + PREFETCH_ROWS] * HEAD_DIM);
        const ELEM *row = k + slots[t] * HEAD_DIM;
        vfloat kf[CHUNKS];
        for (int c = 0; c < CHUNKS; c++) kf[c] = load_elems(row + c * LANES, ALL_LANES);
        for (int h = 0; h < GROUP; h++) {
            vfloat acc = qf[h][0] * kf[0];
            for (int c = 1; c < CHUNKS; c++) acc = vfmadd(qf[h][c], kf[c], acc);
            scores[h * len + t] = reduce_add(acc);
        }
    }
}
#endif

/* In place: scores[h] <- exp(scores[h] - max(scores[h])); inv_sum[h] <- 1 / sum. */
static void item_softmax(float *scores, int64_t len, float *inv_sum) {
    for (int h = 0; h < GROUP; h++) {
        float *s = scores + h * len;
        const vfloat minus_inf = vset1(-__builtin_inff());
        vfloat most = minus_inf;
        for (int64_t t = 0; t < len; t += LANES) {
            const vmask m = tail_mask(len - t);
            most = vmax(most, vselect(mask_pred(m), load_floats(s + t, m), minus_inf));
        }
        const vfloat top = vset1(reduce_max(most));
        vfloat sum = vzero();
        for (int64_t t = 0; t < len; t += LANES) {
            const vmask m = tail_mask(len - t);
            const vfloat e = vselect(mask_pred(m), vexp(load_floats(s + t, m) - top), vzero());
            store_floats(s + t, e, m);
            sum = sum + e;
        }
        inv_sum[h] = 1.0f / reduce_add(sum);
    }
}

/* out_h = sum_t p[h][t] * v_t / sum_h, for heads [first, first + HEAD_BLOCK) of the item. */
static void item_values(const ELEM *v, const int64_t *slots, int64_t len, const float *probs,
                        const float *inv_sum, int first, ELEM *out) {
    vfloat acc[HEAD_BLOCK][CHUNKS];
    for (int h = 0; h < HEAD_BLOCK; h++)
        for (int c = 0; c < CHUNKS; c++) acc[h][c] = vzero();
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_ROWS < len) prefetch_row(v + slots[t + PREFETCH_ROWS] * HEAD_DIM);
        const ELEM *row = v + slots[t] * HEAD_DIM;
        for (int c = 0; c < CHUNKS; c++) {
            const vfloat vf = load_elems(row + c * LANES, ALL_LANES);
            for (int h = 0; h < HEAD_BLOCK; h++)
                if (first + h < GROUP)
                    acc[h][c] = vfmadd(vset1(probs[(first + h) * len + t]), vf, acc[h][c]);
        }
    }
    for (int h = 0; h < HEAD_BLOCK && first + h < GROUP; h++)
        for (int c = 0; c < CHUNKS; c++)
            store_elems(out + (first + h) * HEAD_DIM + c * LANES,
                        acc[h][c] * vset1(inv_sum[first + h]), ALL_LANES);
}

/* One item: the GROUP query heads at q (HEAD_DIM each) against the `len` K/V rows at `slots`
 * of one KV head's pool (kh, vh); writes GROUP rows at out. `scores` holds GROUP * len
 * floats of scratch. */
static void attend_item(const ELEM *q, const ELEM *kh, const ELEM *vh, const int64_t *slots,
                        int64_t len, float scale, float *scores, ELEM *out) {
    float inv_sum[GROUP];
    item_scores(q, kh, slots, len, scale, scores);
    item_softmax(scores, len, inv_sum);
    for (int first = 0; first < GROUP; first += HEAD_BLOCK)
        item_values(vh, slots, len, scores, inv_sum, first, out);
}

#endif
