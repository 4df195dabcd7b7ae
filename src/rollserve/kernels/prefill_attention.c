/* Prefill (extend) attention on CPU, bfloat16, AVX-512 with AVX512_BF16: one sequence's
 * q_len queries against its kv_len keys, read from the KV pool through the slot list.
 * Query i sees keys 0 .. kv_len - q_len + i (causal, after a cached prefix of
 * kv_len - q_len tokens).
 *
 * SDPA's CPU flash kernel runs this shape (GQA, head_dim 64, a few hundred tokens) at
 * ~85 GFLOP/s on an AVX-512 EPYC without AMX, where a bf16 matmul reaches ~750 on the
 * AVX512_BF16 dot-product instruction (vdpbf16ps: 32 products summed into 16 float32 lanes).
 * This kernel is flash attention built on that instruction (~5x SDPA, BENCHMARKS.md):
 *   1. K and V of each KV head are gathered from the pool by slot once per call and
 *      repacked into the pair-interleaved layouts vdpbf16ps reads (see pack_keys and
 *      pack_values), in blocks of KEY_BLOCK keys padded with zeros;
 *   2. a work item is one KV head and a block of query positions; its rows are the
 *      (position, query head) pairs of the GROUP heads sharing that KV head, position
 *      major, so every key block loaded into L1 serves GROUP times as many rows;
 *   3. for each key block, each tile of ROW_TILE rows computes its scores in registers,
 *      updates its running max and sum (online softmax, in float32), stores its
 *      probabilities as bfloat16 and adds probabilities times V into its float32 output.
 * Key blocks past a tile's last visible key are skipped; in the block holding it, the second
 * half is skipped too when the tile sees none of it.
 *
 * Compiled at run time for one model: HEAD_DIM (a multiple of 32) and GROUP (query heads
 * per KV head) are compile-time constants.
 *
 * Layouts (element strides, row-major):
 *   q        [q_len, kv_heads * GROUP, HEAD_DIM], rows q_stride elements apart (a view into
 *            the QKV projection's output), each row's heads contiguous
 *   out      [q_len, kv_heads * GROUP, HEAD_DIM], contiguous
 *   k, v     [kv_heads, pool_slots, HEAD_DIM]   (one layer of the pool), contiguous
 *   kv_slots [kv_len]                           (int64 pool slots, position order)
 * Work items write disjoint rows of `out`, so they run in parallel without synchronisation.
 */
#include <omp.h>
#include <stdlib.h>

#include "simd.h"

#define PAIRS (HEAD_DIM / 2)          /* bfloat16 pairs per row: vdpbf16ps's unit */
#define KEY_BLOCK 64                  /* keys per block: four vectors of 16 score lanes */
#define KEY_VECTORS (KEY_BLOCK / LANES)
#define KEY_PAIRS (KEY_BLOCK / 2)
/* Output chunks of 16 dims accumulated at once: ROW_TILE * OUT_CHUNKS registers. */
#define OUT_CHUNKS (HEAD_DIM / LANES < 4 ? HEAD_DIM / LANES : 4)
/* Score accumulators ROW_TILE * KEY_VECTORS (16) plus the four K vectors they share fit
 * the 32 registers; four rows amortise each K load over four dot products. */
#define ROW_TILE 4
/* Rows per work item: about 64, so that an item's float32 outputs (ITEM_ROWS * HEAD_DIM)
 * and the K and V blocks it reuses (KEY_BLOCK * HEAD_DIM bfloat16 each) stay in L1. */
#define ITEM_POSITIONS ((64 + GROUP - 1) / GROUP)
#define ITEM_ROWS ((ITEM_POSITIONS * GROUP + ROW_TILE - 1) / ROW_TILE * ROW_TILE)
#define LOG2E 1.44269504088896341f

#if HEAD_DIM % 32
#error "HEAD_DIM must be a multiple of 32"
#endif

typedef struct {
    const uint32_t *q[ROW_TILE]; /* each row as bfloat16 pairs */
    int64_t last_key[ROW_TILE];  /* the last key each row sees */
    float *o[ROW_TILE];          /* float32 output rows, unnormalised */
    float *max[ROW_TILE];        /* running max of the scaled scores, log2 units */
    float *sum[ROW_TILE];        /* running sum of 2^(score - max) */
} Tile;

/* 2^x in float32 for x <= 0 (scores minus their running max). x is split into an integer n
 * and f in [-0.5, 0.5]; 2^f is its Taylor polynomial of degree 6 (relative error < 3e-7),
 * and scalef applies 2^n. x is clamped at -127 (so -inf gives 2^-127, not NaN): results that
 * small are subnormal, which vdpbf16ps reads as 0; masked keys are zeroed explicitly. */
static inline vfloat exp2_nonpositive(vfloat x) {
    x = vmax(x, vset1(-127.0f));
    const vfloat n = round_to_integer(x), f = x - n;
    vfloat p = vset1(1.5403530393381606e-4f);
    p = vfmadd(p, f, vset1(1.3333558146428443e-3f));
    p = vfmadd(p, f, vset1(9.6181291076284772e-3f));
    p = vfmadd(p, f, vset1(5.5504108664821580e-2f));
    p = vfmadd(p, f, vset1(2.4022650695910071e-1f));
    p = vfmadd(p, f, vset1(6.9314718055994531e-1f));
    p = vfmadd(p, f, vset1(1.0f));
    return scale_pow2(p, n);
}

/* The lanes of a 16-key vector starting at key `first` that a row ending at `last` sees. */
static inline __mmask16 visible_lanes(int64_t first, int64_t last) {
    const int64_t count = last - first + 1;
    return count >= LANES ? (__mmask16)0xffff : count <= 0 ? 0 : (__mmask16)((1u << count) - 1u);
}

/* Block b of packed keys: [PAIRS][KEY_BLOCK] uint32, element (p, j) = key j's dims 2p, 2p+1.
 * A vector of it holds one pair of 16 keys: vdpbf16ps against a broadcast query pair adds
 * that pair's products to 16 keys' scores. Keys past kv_len are zero. */
static void pack_keys(const ELEM *k, const int64_t *slots, int64_t kv_len, int64_t block,
                      uint32_t *packed) {
    for (int j = 0; j < KEY_BLOCK; j++) {
        const int64_t key = block * KEY_BLOCK + j;
        const uint32_t *row = key < kv_len ? (const uint32_t *)(k + slots[key] * HEAD_DIM) : NULL;
        for (int p = 0; p < PAIRS; p++) packed[p * KEY_BLOCK + j] = row ? row[p] : 0;
    }
}

/* Block b of packed values: [KEY_PAIRS][HEAD_DIM] uint32, element (j, d) = dim d of keys
 * 2j and 2j+1. A vector holds 16 dims of a key pair: vdpbf16ps against a broadcast pair of
 * probabilities adds both keys' weighted values to 16 output dims. Keys past kv_len are
 * zero (their probabilities are 0, and 0 * garbage could be NaN). */
static void pack_values(const ELEM *v, const int64_t *slots, int64_t kv_len, int64_t block,
                        uint32_t *packed) {
    /* Interleave 16-bit lanes: idx[2i] = i of the first row, idx[2i+1] = i of the second. */
    __m512i low_idx, high_idx;
    {
        uint16_t low[32], high[32];
        for (int i = 0; i < 16; i++) {
            low[2 * i] = (uint16_t)i, low[2 * i + 1] = (uint16_t)(32 + i);
            high[2 * i] = (uint16_t)(16 + i), high[2 * i + 1] = (uint16_t)(48 + i);
        }
        low_idx = _mm512_loadu_si512(low), high_idx = _mm512_loadu_si512(high);
    }
    for (int j = 0; j < KEY_PAIRS; j++) {
        const int64_t key = block * KEY_BLOCK + 2 * j;
        const ELEM *first = key < kv_len ? v + slots[key] * HEAD_DIM : NULL;
        const ELEM *second = key + 1 < kv_len ? v + slots[key + 1] * HEAD_DIM : NULL;
        for (int d = 0; d < HEAD_DIM; d += 32) {
            const __m512i a = first ? _mm512_loadu_si512(first + d) : _mm512_setzero_si512();
            const __m512i b = second ? _mm512_loadu_si512(second + d) : _mm512_setzero_si512();
            uint32_t *dst = packed + j * HEAD_DIM + d;
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, low_idx, b));
            _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(a, high_idx, b));
        }
    }
}

/* One tile against one key block starting at key `first`: scores for the first `vectors`
 * 16-key vectors (the rest are all invisible to the tile), the online-softmax update, and
 * the output update. `masked`: some row does not see every computed key. `probs` is
 * scratch for ROW_TILE rows of KEY_PAIRS bfloat16 pairs. always_inline with constant `vectors` and
 * `masked` (see tile_block) unrolls the vector loops into registers. */
static inline __attribute__((always_inline)) void tile_step(
    const Tile *t, const uint32_t *keys, const uint32_t *values, int64_t first, float qk_scale,
    const int vectors, const int masked, uint32_t *probs) {
    vfloat acc[ROW_TILE][KEY_VECTORS];
    for (int r = 0; r < ROW_TILE; r++)
        for (int c = 0; c < vectors; c++) acc[r][c] = vzero();
    for (int p = 0; p < PAIRS; p++) {
        __m512bh kv[KEY_VECTORS];
        for (int c = 0; c < vectors; c++)
            kv[c] = (__m512bh)_mm512_loadu_si512(keys + p * KEY_BLOCK + c * LANES);
        for (int r = 0; r < ROW_TILE; r++) {
            const __m512bh qp = (__m512bh)_mm512_set1_epi32((int)t->q[r][p]);
            for (int c = 0; c < vectors; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qp, kv[c]);
        }
    }
    float alpha[ROW_TILE];
    for (int r = 0; r < ROW_TILE; r++) {
        __mmask16 visible[KEY_VECTORS];
        vfloat top = vset1(-__builtin_inff());
        for (int c = 0; c < vectors; c++) {
            acc[r][c] = acc[r][c] * vset1(qk_scale);
            visible[c] = masked ? visible_lanes(first + c * LANES, t->last_key[r]) : 0xffff;
            top = _mm512_mask_max_ps(top, visible[c], top, acc[r][c]);
        }
        /* new_max is finite: every row sees key 0 in block 0, the first block a tile
         * computes, and a row that sees no key of a later block keeps its max. */
        const float old_max = *t->max[r];
        const float new_max = __builtin_fmaxf(old_max, reduce_max(top));
        const vfloat shift = vset1(new_max);
        vfloat total = vzero();
        for (int c = 0; c < vectors; c++) {
            acc[r][c] = _mm512_maskz_mov_ps(visible[c], exp2_nonpositive(acc[r][c] - shift));
            total = total + acc[r][c];
        }
        alpha[r] = _mm512_cvtss_f32(exp2_nonpositive(vset1(old_max - new_max)));
        *t->max[r] = new_max;
        *t->sum[r] = *t->sum[r] * alpha[r] + reduce_add(total);
        for (int c = 0; c < vectors; c += 2)
            _mm512_storeu_si512(probs + r * KEY_PAIRS + c * LANES / 2,
                                (__m512i)_mm512_cvtne2ps_pbh(acc[r][c + 1], acc[r][c]));
    }
    const int pairs = vectors * LANES / 2;
    for (int d = 0; d < HEAD_DIM; d += OUT_CHUNKS * LANES) {
        vfloat out[ROW_TILE][OUT_CHUNKS];
        for (int r = 0; r < ROW_TILE; r++)
            for (int c = 0; c < OUT_CHUNKS; c++)
                out[r][c] = load_floats(t->o[r] + d + c * LANES, ALL_LANES) * vset1(alpha[r]);
        for (int j = 0; j < pairs; j++) {
            __m512bh vv[OUT_CHUNKS];
            for (int c = 0; c < OUT_CHUNKS; c++)
                vv[c] = (__m512bh)_mm512_loadu_si512(values + j * HEAD_DIM + d + c * LANES);
            for (int r = 0; r < ROW_TILE; r++) {
                const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)probs[r * KEY_PAIRS + j]);
                for (int c = 0; c < OUT_CHUNKS; c++)
                    out[r][c] = _mm512_dpbf16_ps(out[r][c], pp, vv[c]);
            }
        }
        for (int r = 0; r < ROW_TILE; r++)
            for (int c = 0; c < OUT_CHUNKS; c++)
                store_floats(t->o[r] + d + c * LANES, out[r][c], ALL_LANES);
    }
}

/* tile_step specialised for the 16-key vectors of the block that the tile sees, rounded up
 * to 2 or 4 (probabilities are stored two vectors at a time), and for whether any computed
 * key is hidden from a row. */
static void tile_block(const Tile *t, const uint32_t *keys, const uint32_t *values,
                       int64_t first, float qk_scale, uint32_t *probs) {
    const int64_t last = t->last_key[ROW_TILE - 1];
    const int64_t needed = (last - first) / LANES + 1;
    const int masked = first + KEY_BLOCK - 1 > t->last_key[0];
    if (!masked) tile_step(t, keys, values, first, qk_scale, KEY_VECTORS, 0, probs);
    else if (needed <= 2) tile_step(t, keys, values, first, qk_scale, 2, 1, probs);
    else tile_step(t, keys, values, first, qk_scale, KEY_VECTORS, 1, probs);
}

/* Rows [0, ITEM_ROWS) of an item: (position, head) = (first + r / GROUP, r % GROUP), rows
 * past the real ones repeating the last real row (computed, never stored). */
static void item_attention(const ELEM *q, int64_t q_stride, const uint32_t *keys,
                           const uint32_t *values, int64_t first, int64_t positions,
                           int64_t offset, float qk_scale, float *scratch, ELEM *out,
                           int64_t out_stride) {
    float *o = scratch, *max = o + ITEM_ROWS * HEAD_DIM, *sum = max + ITEM_ROWS;
    uint32_t *probs = (uint32_t *)(sum + ITEM_ROWS);
    const int64_t real = positions * GROUP;
    Tile tiles[ITEM_ROWS / ROW_TILE];
    for (int r = 0; r < ITEM_ROWS; r++) {
        const int64_t row = r < real ? r : real - 1;
        const int64_t position = first + row / GROUP;
        Tile *t = &tiles[r / ROW_TILE];
        const int i = r % ROW_TILE;
        t->q[i] = (const uint32_t *)(q + position * q_stride + row % GROUP * HEAD_DIM);
        t->last_key[i] = offset + position;
        t->o[i] = o + r * HEAD_DIM, t->max[i] = max + r, t->sum[i] = sum + r;
        max[r] = -__builtin_inff(), sum[r] = 0.0f;
        for (int d = 0; d < HEAD_DIM; d++) o[r * HEAD_DIM + d] = 0.0f;
    }
    const int64_t last = offset + first + positions - 1;
    for (int64_t block = 0; block * KEY_BLOCK <= last; block++) {
        const uint32_t *kb = keys + block * PAIRS * KEY_BLOCK;
        const uint32_t *vb = values + block * KEY_PAIRS * HEAD_DIM;
        for (int i = 0; i < ITEM_ROWS / ROW_TILE; i++)
            if (block * KEY_BLOCK <= tiles[i].last_key[ROW_TILE - 1])
                tile_block(&tiles[i], kb, vb, block * KEY_BLOCK, qk_scale, probs);
    }
    for (int64_t r = 0; r < real; r++) {
        const vfloat norm = vset1(1.0f / sum[r]);
        ELEM *dst = out + (first + r / GROUP) * out_stride + r % GROUP * HEAD_DIM;
        for (int d = 0; d < HEAD_DIM; d += LANES)
            store_elems(dst + d, load_floats(o + r * HEAD_DIM + d, ALL_LANES) * norm, ALL_LANES);
    }
}

/* Returns 0, or -1 when scratch memory cannot be had (nothing is written then). */
int prefill_attention(const ELEM *q, int64_t q_stride, const ELEM *k, const ELEM *v,
                      int64_t pool_slots, const int64_t *kv_slots, int64_t kv_len,
                      int64_t q_len, ELEM *out, int64_t kv_heads, float scale, int threads) {
    const int64_t blocks = (kv_len + KEY_BLOCK - 1) / KEY_BLOCK;
    const int64_t head_words = blocks * KEY_BLOCK * PAIRS; /* uint32 per head, K or V */
    const int64_t item_floats = /* outputs, max, sum, then the bfloat16 probabilities */
        (ITEM_ROWS * (HEAD_DIM + 2) + ROW_TILE * KEY_BLOCK / 2 + 15) / 16 * 16;
    uint32_t *packed = aligned_alloc(64, (size_t)(2 * kv_heads * head_words) * sizeof(uint32_t));
    float *scratch = aligned_alloc(64, (size_t)(threads * item_floats) * sizeof(float));
    if (packed == NULL || scratch == NULL) {
        free(packed);
        free(scratch);
        return -1;
    }
    uint32_t *keys = packed, *values = packed + kv_heads * head_words;
    const int64_t q_blocks = (q_len + ITEM_POSITIONS - 1) / ITEM_POSITIONS;
    const int64_t items = kv_heads * q_blocks;
    const int64_t offset = kv_len - q_len;
    const int64_t heads_stride = kv_heads * GROUP * HEAD_DIM;
    /* log2 units: softmax(s * scale) = 2^(s * scale * log2 e) normalised. */
    const float qk_scale = scale * LOG2E;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < 2 * kv_heads * blocks; job++) {
            const int64_t head = job / 2 % kv_heads, block = job / 2 / kv_heads;
            uint32_t *dst = (job % 2 ? values : keys) + head * head_words
                            + block * KEY_BLOCK * PAIRS;
            if (job % 2)
                pack_values(v + head * pool_slots * HEAD_DIM, kv_slots, kv_len, block, dst);
            else
                pack_keys(k + head * pool_slots * HEAD_DIM, kv_slots, kv_len, block, dst);
        }
        float *mine = scratch + omp_get_thread_num() * item_floats;
        /* Latest query blocks first: they see the most keys, and finishing with the
         * cheap early ones balances the threads. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            const int64_t block = q_blocks - 1 - item / kv_heads, head = item % kv_heads;
            const int64_t first = block * ITEM_POSITIONS;
            const int64_t positions = q_len - first < ITEM_POSITIONS ? q_len - first
                                                                      : ITEM_POSITIONS;
            item_attention(q + head * GROUP * HEAD_DIM, q_stride, keys + head * head_words,
                           values + head * head_words, first, positions, offset, qk_scale,
                           mine, out + head * GROUP * HEAD_DIM, heads_stride);
        }
    }
    free(packed);
    free(scratch);
    return 0;
}
