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
/* bfloat16 where the CPU has AVX512_BF16 (the build passes -mavx512bf16): dot products on
 * 32-bit units, each a pair of bfloat16, with vdpbf16ps (see the DOT_PAIRS functions below).
 * Elsewhere every element is widened to float32 and multiplied with FMAs. */
#if ELEM_IS_BF16 && defined(__AVX512BF16__) && HEAD_DIM % 32 == 0
#define DOT_PAIRS 1
#define ROW_UNITS (HEAD_DIM / 2)
#else
#define DOT_PAIRS 0
#endif
/* K/V rows are requested this many rows ahead of use. Rows follow the slot table, not
 * addresses, so the hardware prefetcher misses them; without this each item stalls on DRAM
 * and then computes, serially (35% more time per layer at 43-128 sequences, cold caches).
 * The vdpbf16ps path spends half the time on a row, so it asks further ahead and into L2
 * (which keeps more misses in flight than L1): 1.15-1.2x its speed with 16 rows into L1,
 * where the paths that widen to float32 lost up to 13% (AVX2, bf16) asking so far. */
#if DOT_PAIRS
#define PREFETCH_ROWS 32
#define PREFETCH_HINT _MM_HINT_T1
#else
#define PREFETCH_ROWS 16
#define PREFETCH_HINT _MM_HINT_T0
#endif
#define ROW_BYTES (HEAD_DIM * (int)sizeof(ELEM))

static inline void prefetch_row(const ELEM *row) {
    for (int offset = 0; offset < ROW_BYTES; offset += 64)
        _mm_prefetch((const char *)row + offset, PREFETCH_HINT);
}

/* The first rows an item reads from `rows` (K before its scores, V before its values). */
static inline void prefetch_first_rows(const ELEM *rows, const int64_t *slots, int64_t len) {
    for (int64_t t = 0; t < PREFETCH_ROWS && t < len; t++) prefetch_row(rows + slots[t] * HEAD_DIM);
}
/* Query heads whose output accumulators (CHUNKS registers each) are live at once: all the
 * registers but a few for the V chunk, the broadcast probability and addresses. */
#define ACCUMULATORS (VREGS - 4)
#define HEAD_BLOCK (GROUP * CHUNKS <= ACCUMULATORS ? GROUP \
                    : (ACCUMULATORS / CHUNKS > 0 ? ACCUMULATORS / CHUNKS : 1))

/* rows <- the K rows of keys [first, first + LANES) (lanes past len reread key first's
 * row; their scores are never stored), with the block PREFETCH_ROWS ahead requested.
 * Returns how many keys are real. */
static inline int block_rows(const ELEM *k, const int64_t *slots, int64_t len, int64_t first,
                             const ELEM *rows[LANES]) {
    const int count = len - first < LANES ? (int)(len - first) : LANES;
    for (int j = 0; j < LANES; j++) rows[j] = k + slots[first + (j < count ? j : 0)] * HEAD_DIM;
    for (int64_t t = first + PREFETCH_ROWS; t < first + PREFETCH_ROWS + LANES && t < len; t++)
        prefetch_row(k + slots[t] * HEAD_DIM);
    return count;
}

/* scores[h * len + t] = scale * q_h . k_t for the GROUP heads of one item. */
#if DOT_PAIRS
/* The 32-bit unit at p (a bf16 pair of q, or of packed probabilities). */
static inline uint32_t load_unit(const void *p) {
    uint32_t unit;
    memcpy(&unit, p, sizeof unit);
    return unit;
}
#endif

#if DOT_PAIRS && GROUP >= 4

/* Transposing LANES K rows' units puts pair p of LANES tokens in one register; a head's scores
 * then build up with one vdpbf16ps per pair against the broadcast pair of q: half the dot
 * instructions and transposes of the float32 path, and no widening. q stays bfloat16, so the
 * products are exact; the scale multiplies the float32 scores. With fewer than 4 heads a
 * transpose serves too few products: there the per-row scores below were faster (1.1x at 3
 * heads, 1.2x at 2). */
static void item_scores(const ELEM *q, const ELEM *k, const int64_t *slots, int64_t len,
                        float scale, float *scores) {
    for (int64_t first = 0; first < len; first += LANES) {
        const ELEM *rows[LANES];
        const int count = block_rows(k, slots, len, first, rows);
        vfloat acc[GROUP];
        UNROLLED
        for (int h = 0; h < GROUP; h++) acc[h] = vzero();
        for (int c = 0; c < ROW_UNITS / LANES; c++) {
            vfloat block[LANES]; /* bit patterns of units: the transpose only moves them */
            UNROLLED
            for (int j = 0; j < LANES; j++)
                block[j] = _mm512_castsi512_ps(_mm512_loadu_si512(rows[j] + c * 2 * LANES));
            transpose_block(block);
            UNROLLED
            for (int h = 0; h < GROUP; h++)
                UNROLLED
                for (int p = 0; p < LANES; p++) {
                    const uint32_t pair = load_unit(q + h * HEAD_DIM + (c * LANES + p) * 2);
                    acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)_mm512_castps_si512(block[p]),
                                              (__m512bh)_mm512_set1_epi32((int)pair));
                }
        }
        const vmask mask = tail_mask(count);
        UNROLLED
        for (int h = 0; h < GROUP; h++)
            store_floats(scores + h * len + first, acc[h] * vset1(scale), mask);
    }
}
#elif GROUP >= 4
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
        const ELEM *rows[LANES];
        const int count = block_rows(k, slots, len, first, rows);
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

static inline float row_max(const float *s, int64_t len) {
    const vfloat minus_inf = vset1(-__builtin_inff());
    vfloat most = minus_inf;
    for (int64_t t = 0; t < len; t += LANES) {
        const vmask m = tail_mask(len - t);
        most = vmax(most, vselect(mask_pred(m), load_floats(s + t, m), minus_inf));
    }
    return reduce_max(most);
}

/* exp(s[t] - top) for the LANES keys from t; 0 past len. */
static inline vfloat exp_lanes(const float *s, int64_t t, int64_t len, vfloat top) {
    const vmask m = tail_mask(len - t);
    return vselect(mask_pred(m), vexp(load_floats(s + t, m) - top), vzero());
}

#if DOT_PAIRS
/* In place, each head's row of scores -> its probabilities' (len + 1) / 2 units at the
 * row's start: unit i is the bfloat16 pair (p[2i], p[2i + 1]), the last one of an odd row
 * (p[len - 1], 0); p = exp(score - max), unnormalised; inv_sum[h] <- 1 / the float32 sum.
 * Rounding the probabilities to bfloat16 for the products with V is what SDPA's bfloat16
 * path and the prefill kernel do. Each step reads its 2 * LANES floats before it writes
 * LANES units over floats already read. */
static void item_softmax(float *scores, int64_t len, float *inv_sum) {
    for (int h = 0; h < GROUP; h++) {
        float *s = scores + h * len;
        const vfloat top = vset1(row_max(s, len));
        vfloat sum = vzero();
        for (int64_t t = 0; t < len; t += 2 * LANES) {
            const vfloat low = exp_lanes(s, t, len, top);
            const vfloat high = len - t > LANES ? exp_lanes(s, t + LANES, len, top) : vzero();
            sum = sum + low + high;
            const __m512i units = (__m512i)_mm512_cvtne2ps_pbh(high, low);
            const int64_t count = (len - t + 1) / 2;
            if (count >= LANES) _mm512_storeu_si512(s + t / 2, units);
            else _mm512_mask_storeu_epi32(s + t / 2, (__mmask16)((1u << count) - 1u), units);
        }
        inv_sum[h] = 1.0f / reduce_add(sum);
    }
}
#else
/* In place: scores[h] <- exp(scores[h] - max(scores[h])); inv_sum[h] <- 1 / sum. */
static void item_softmax(float *scores, int64_t len, float *inv_sum) {
    for (int h = 0; h < GROUP; h++) {
        float *s = scores + h * len;
        const vfloat top = vset1(row_max(s, len));
        vfloat sum = vzero();
        for (int64_t t = 0; t < len; t += LANES) {
            const vfloat e = exp_lanes(s, t, len, top);
            store_floats(s + t, e, tail_mask(len - t));
            sum = sum + e;
        }
        inv_sum[h] = 1.0f / reduce_add(sum);
    }
}
#endif

#if DOT_PAIRS
/* A head's CHUNKS accumulators hold dims [32c, 32c + 32) in acc[2c], acc[2c + 1]: unpacking
 * two V rows interleaves them
 * within 128-bit lanes, so `low` holds dims 8L..8L+3 and `high` dims 8L+4..8L+7 in lane
 * group L. Returns the 16 dims from 16 * half in order. */
static inline vfloat pair_dims(vfloat low, vfloat high, int half) {
    const __m512i order = half ? _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27,
                                                   12, 13, 14, 15, 28, 29, 30, 31)
                               : _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19,
                                                   4, 5, 6, 7, 20, 21, 22, 23);
    return _mm512_permutex2var_ps(low, order, high);
}

/* acc += the products of keys t and t + 1 (V rows a and b; b NULL: key t alone) with the
 * heads' probability pairs `pairs` (unit t / 2 of each head's packed row). */
static inline __attribute__((always_inline)) void add_value_pair(
    const ELEM *a, const ELEM *b, const float *pairs, int64_t row_units, int first,
    vfloat acc[][CHUNKS]) {
    UNROLLED
    for (int c = 0; c < HEAD_DIM / 32; c++) {
        const __m512i va = _mm512_loadu_si512(a + 32 * c);
        const __m512i vb = b ? _mm512_loadu_si512(b + 32 * c) : _mm512_setzero_si512();
        const __m512bh low = (__m512bh)_mm512_unpacklo_epi16(va, vb);
        const __m512bh high = (__m512bh)_mm512_unpackhi_epi16(va, vb);
        UNROLLED
        for (int h = 0; h < HEAD_BLOCK; h++)
            if (first + h < GROUP) {
                const __m512bh p = (__m512bh)_mm512_set1_epi32(
                    (int)load_unit(pairs + (first + h) * row_units));
                acc[h][2 * c] = _mm512_dpbf16_ps(acc[h][2 * c], low, p);
                acc[h][2 * c + 1] = _mm512_dpbf16_ps(acc[h][2 * c + 1], high, p);
            }
    }
}

/* out_h = sum_t p[h][t] * v_t / sum_h, for heads [first, first + HEAD_BLOCK) of the item,
 * from the packed probabilities: one vdpbf16ps adds two keys' products into each lane. */
static void item_values(const ELEM *v, const int64_t *slots, int64_t len, const float *probs,
                        const float *inv_sum, int first, ELEM *out) {
    vfloat acc[HEAD_BLOCK][CHUNKS];
    UNROLLED
    for (int h = 0; h < HEAD_BLOCK; h++)
        UNROLLED
        for (int c = 0; c < CHUNKS; c++) acc[h][c] = vzero();
    int64_t t = 0;
    for (; t + 1 < len; t += 2) {
        for (int64_t ahead = t + PREFETCH_ROWS; ahead < t + PREFETCH_ROWS + 2 && ahead < len;
             ahead++)
            prefetch_row(v + slots[ahead] * HEAD_DIM);
        add_value_pair(v + slots[t] * HEAD_DIM, v + slots[t + 1] * HEAD_DIM, probs + t / 2,
                       len, first, acc);
    }
    if (t < len) add_value_pair(v + slots[t] * HEAD_DIM, NULL, probs + t / 2, len, first, acc);
    for (int h = 0; h < HEAD_BLOCK && first + h < GROUP; h++)
        for (int c = 0; c < HEAD_DIM / 32; c++)
            for (int half = 0; half < 2; half++)
                store_elems(out + (first + h) * HEAD_DIM + 32 * c + 16 * half,
                            pair_dims(acc[h][2 * c], acc[h][2 * c + 1], half) *
                                vset1(inv_sum[first + h]),
                            ALL_LANES);
}
#else
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
#endif

/* One item: the GROUP query heads at q (HEAD_DIM each) against the `len` K/V rows at `slots`
 * of one KV head's pool (kh, vh); writes GROUP rows at out. `scores` holds GROUP * len
 * floats of scratch. */
static void attend_item(const ELEM *q, const ELEM *kh, const ELEM *vh, const int64_t *slots,
                        int64_t len, float scale, float *scores, ELEM *out) {
    float inv_sum[GROUP];
    prefetch_first_rows(kh, slots, len);
    item_scores(q, kh, slots, len, scale, scores);
    prefetch_first_rows(vh, slots, len);
    item_softmax(scores, len, inv_sum);
    for (int first = 0; first < GROUP; first += HEAD_BLOCK)
        item_values(vh, slots, len, scores, inv_sum, first, out);
}

#endif
