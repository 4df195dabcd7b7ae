/* Prefill (extend) attention on CPU: one sequence's q_len queries against its kv_len keys,
 * read from the KV pool through the slot list. Query i sees keys 0 .. kv_len - q_len + i
 * (causal, after a cached prefix of kv_len - q_len tokens).
 *
 * SDPA's CPU flash kernel runs this shape (GQA, head_dim 64, a few hundred tokens) at
 * ~80 GFLOP/s on an AVX-512 EPYC without AMX, in bfloat16 and in float32 alike, where a
 * matmul reaches ~750 (bf16) and ~500 (float32) GFLOP/s. This kernel is flash attention
 * built on the CPU's dot-product instructions (BENCHMARKS.md):
 *   1. K and V of each KV head are gathered from the pool by slot once per call and
 *      repacked into the layouts the dot products read (see pack_keys and pack_values), in
 *      blocks of KEY_BLOCK keys padded with zeros;
 *   2. a work item is one KV head and a block of query positions; its rows are the
 *      (position, query head) pairs of the GROUP heads sharing that KV head, position
 *      major, so every key block loaded into L1 serves GROUP times as many rows;
 *   3. for each key block, each tile of ROW_TILE rows computes its scores in registers,
 *      updates its running max and sum (online softmax, in float32), stores its
 *      probabilities as units and adds probabilities times V into its float32 output.
 * Key blocks past a tile's last visible key are skipped; in the block holding it, the second
 * half is skipped too when the tile sees none of it.
 *
 * The dot products work on 32-bit units. bfloat16 (AVX-512 with AVX512_BF16): a unit is a
 * pair of bfloat16, and vdpbf16ps adds the two products of a broadcast pair and a vector of
 * pairs into each float32 lane. float32 (AVX-512 or AVX2 + FMA): a unit is one float, and the
 * product is an FMA. Every layout below is in units, so one code serves both.
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

#if ELEM_IS_BF16
#if !defined(__AVX512BF16__)
#error "the bfloat16 kernel needs AVX512_BF16 (vdpbf16ps)"
#endif
#define UNIT_ELEMS 2 /* a bfloat16 pair: dims 2p, 2p+1 of a row, or one dim of keys 2j, 2j+1 */
typedef uint32_t unit;
typedef __m512bh vunits;
static inline vunits load_units(const unit *p) { return (vunits)_mm512_loadu_si512(p); }
static inline vunits broadcast_unit(unit u) { return (vunits)_mm512_set1_epi32((int)u); }
static inline vfloat dot_units(vfloat acc, vunits a, vunits b) { return _mm512_dpbf16_ps(acc, a, b); }
/* Two vectors of probabilities as LANES bfloat16 pairs: `low`'s keys first. */
static inline void store_probs(unit *p, vfloat low, vfloat high) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(high, low));
}
#else
#define UNIT_ELEMS 1 /* a float */
typedef float unit;
typedef vfloat vunits;
static inline vunits load_units(const unit *p) { return load_floats(p, ALL_LANES); }
static inline vunits broadcast_unit(unit u) { return vset1(u); }
static inline vfloat dot_units(vfloat acc, vunits a, vunits b) { return vfmadd(a, b, acc); }
static inline void store_probs(unit *p, vfloat low, vfloat high) {
    store_floats(p, low, ALL_LANES);
    store_floats(p + LANES, high, ALL_LANES);
}
#endif

#define ROW_UNITS (HEAD_DIM / UNIT_ELEMS) /* units in a query or key row */
#define KEY_VECTORS 4                     /* score vectors per row and key block */
#define KEY_BLOCK (KEY_VECTORS * LANES)   /* keys per block */
#define KEY_UNITS (KEY_BLOCK / UNIT_ELEMS) /* units of a block's probabilities per row */
#define VECTOR_KEYS (LANES / UNIT_ELEMS)   /* keys whose values one vector of units holds */
/* Output chunks of LANES dims accumulated at once: ROW_TILE * OUT_CHUNKS registers. */
#define OUT_CHUNKS (HEAD_DIM / LANES % 4 == 0 ? 4 : HEAD_DIM / LANES % 2 == 0 ? 2 : 1)
/* Score accumulators ROW_TILE * KEY_VECTORS plus the key vectors they share fit the
 * registers (16 + 4 of AVX-512's 32; AVX2's 12 accumulators leave 4 of its 16, and FMAs
 * there read K from L1 directly); every key vector loaded serves ROW_TILE dot products.
 * Measured on an AVX-512 EPYC: 5 rows no faster than 4, AVX2 3 rows 1.1-1.2x 2 rows. */
#define ROW_TILE (VREGS == 32 ? 4 : 3)
/* Rows per work item: about 64, so that an item's float32 outputs (ITEM_ROWS * HEAD_DIM)
 * and the K and V blocks it reuses stay close: in L1 for bf16 at HEAD_DIM 64 (16 + 16 KB);
 * float32's blocks are twice that, and 32 or 128 rows measured no faster. */
#define ITEM_POSITIONS ((64 + GROUP - 1) / GROUP)
#define ITEM_ROWS ((ITEM_POSITIONS * GROUP + ROW_TILE - 1) / ROW_TILE * ROW_TILE)
#define LOG2E 1.44269504088896341f

#if HEAD_DIM % 32
#error "HEAD_DIM must be a multiple of 32"
#endif

typedef struct {
    const unit *q[ROW_TILE];    /* each row as units */
    int64_t last_key[ROW_TILE]; /* the last key each row sees */
    float *o[ROW_TILE];         /* float32 output rows, unnormalised */
    float *max[ROW_TILE];       /* running max of the scaled scores, log2 units */
    float *sum[ROW_TILE];       /* running sum of 2^(score - max) */
} Tile;

/* 2^x in float32 for x <= 0 (scores minus their running max). x is split into an integer n
 * and f in [-0.5, 0.5]; 2^f is its Taylor polynomial of degree 6 (relative error < 3e-7),
 * and scale_pow2 applies 2^n. x is clamped at -127 (so -inf gives 2^-127, not NaN): results
 * that small are subnormal or tiny, and a masked key's probability is zeroed explicitly. */
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

/* The lanes of a vector of keys starting at key `first` that a row ending at `last` sees. */
static inline vpred visible_lanes(int64_t first, int64_t last) {
    const int64_t count = last - first + 1;
    return mask_pred(tail_mask(count > 0 ? count : 0));
}

/* Block b of packed keys: [ROW_UNITS][KEY_BLOCK] units, element (p, j) = unit p of key j.
 * A vector of it holds unit p of LANES keys: a dot product against query unit p,
 * broadcast, adds that unit's products to LANES keys' scores. Keys past kv_len are zero. */
static void pack_keys(const ELEM *k, const int64_t *slots, int64_t kv_len, int64_t block,
                      unit *packed) {
    for (int j = 0; j < KEY_BLOCK; j++) {
        const int64_t key = block * KEY_BLOCK + j;
        const unit *row = key < kv_len ? (const unit *)(k + slots[key] * HEAD_DIM) : NULL;
        for (int p = 0; p < ROW_UNITS; p++) packed[p * KEY_BLOCK + j] = row ? row[p] : 0;
    }
}

#if ELEM_IS_BF16
/* Block b of packed values: [KEY_UNITS][HEAD_DIM] units, element (j, d) = dim d of keys 2j
 * and 2j+1. A vector holds 16 dims of a key pair: vdpbf16ps against a broadcast pair of
 * probabilities adds both keys' weighted values to 16 output dims. Keys past kv_len are
 * zero (their probabilities are 0, and 0 * garbage could be NaN). */
static void pack_values(const ELEM *v, const int64_t *slots, int64_t kv_len, int64_t block,
                        unit *packed) {
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
    for (int j = 0; j < KEY_UNITS; j++) {
        const int64_t key = block * KEY_BLOCK + 2 * j;
        const ELEM *first = key < kv_len ? v + slots[key] * HEAD_DIM : NULL;
        const ELEM *second = key + 1 < kv_len ? v + slots[key + 1] * HEAD_DIM : NULL;
        for (int d = 0; d < HEAD_DIM; d += 32) {
            const __m512i a = first ? _mm512_loadu_si512(first + d) : _mm512_setzero_si512();
            const __m512i b = second ? _mm512_loadu_si512(second + d) : _mm512_setzero_si512();
            unit *dst = packed + j * HEAD_DIM + d;
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, low_idx, b));
            _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(a, high_idx, b));
        }
    }
}
#else
/* Block b of packed values: [KEY_BLOCK][HEAD_DIM] floats, the block's value rows in key
 * order. Keys past kv_len are zero (their probabilities are 0, and 0 * garbage could be
 * NaN). */
static void pack_values(const ELEM *v, const int64_t *slots, int64_t kv_len, int64_t block,
                        unit *packed) {
    for (int j = 0; j < KEY_BLOCK; j++) {
        const int64_t key = block * KEY_BLOCK + j;
        if (key < kv_len) memcpy(packed + j * HEAD_DIM, v + slots[key] * HEAD_DIM,
                                 HEAD_DIM * sizeof(float));
        else memset(packed + j * HEAD_DIM, 0, HEAD_DIM * sizeof(float));
    }
}
#endif

/* One tile against one key block starting at key `first`: scores for the first `vectors`
 * vectors of keys (the rest are all invisible to the tile), the online-softmax update, and
 * the output update. `masked`: some row does not see every computed key. `probs` is
 * scratch for ROW_TILE rows of KEY_UNITS units. always_inline with constant `vectors` and
 * `masked` (see tile_block) unrolls the vector loops into registers. */
static inline __attribute__((always_inline)) void tile_step(
    const Tile *t, const unit *keys, const unit *values, int64_t first, float qk_scale,
    const int vectors, const int masked, unit *probs) {
    vfloat acc[ROW_TILE][KEY_VECTORS];
    UNROLLED
    for (int r = 0; r < ROW_TILE; r++)
        UNROLLED
        for (int c = 0; c < vectors; c++) acc[r][c] = vzero();
    for (int p = 0; p < ROW_UNITS; p++) {
        vunits kv[KEY_VECTORS];
        UNROLLED
        for (int c = 0; c < vectors; c++) kv[c] = load_units(keys + p * KEY_BLOCK + c * LANES);
        UNROLLED
        for (int r = 0; r < ROW_TILE; r++) {
            const vunits qp = broadcast_unit(t->q[r][p]);
            UNROLLED
            for (int c = 0; c < vectors; c++) acc[r][c] = dot_units(acc[r][c], qp, kv[c]);
        }
    }
    float alpha[ROW_TILE];
    UNROLLED
    for (int r = 0; r < ROW_TILE; r++) {
        vpred visible[KEY_VECTORS];
        vfloat top = vset1(-__builtin_inff());
        UNROLLED
        for (int c = 0; c < vectors; c++) {
            acc[r][c] = acc[r][c] * vset1(qk_scale);
            if (masked) {
                visible[c] = visible_lanes(first + c * LANES, t->last_key[r]);
                top = vselect(visible[c], vmax(top, acc[r][c]), top);
            } else {
                top = vmax(top, acc[r][c]);
            }
        }
        /* new_max is finite: every row sees key 0 in block 0, the first block a tile
         * computes, and a row that sees no key of a later block keeps its max. */
        const float old_max = *t->max[r];
        const float new_max = __builtin_fmaxf(old_max, reduce_max(top));
        const vfloat shift = vset1(new_max);
        vfloat total = vzero();
        UNROLLED
        for (int c = 0; c < vectors; c++) {
            acc[r][c] = exp2_nonpositive(acc[r][c] - shift);
            if (masked) acc[r][c] = vselect(visible[c], acc[r][c], vzero());
            total = total + acc[r][c];
        }
        /* On a row's first block old_max is -inf and its output and sum are 0: alpha = 0
         * there, not exp2's 2^-127, a subnormal that costs microcode assists on some CPUs. */
        alpha[r] = old_max == -__builtin_inff()
                       ? 0.0f : reduce_max(exp2_nonpositive(vset1(old_max - new_max)));
        *t->max[r] = new_max;
        *t->sum[r] = *t->sum[r] * alpha[r] + reduce_add(total);
        UNROLLED
        for (int c = 0; c < vectors; c += 2)
            store_probs(probs + r * KEY_UNITS + c * LANES / UNIT_ELEMS, acc[r][c], acc[r][c + 1]);
    }
    const int units = vectors * LANES / UNIT_ELEMS;
    for (int d = 0; d < HEAD_DIM; d += OUT_CHUNKS * LANES) {
        vfloat out[ROW_TILE][OUT_CHUNKS];
        UNROLLED
        for (int r = 0; r < ROW_TILE; r++)
            UNROLLED
            for (int c = 0; c < OUT_CHUNKS; c++)
                out[r][c] = load_floats(t->o[r] + d + c * LANES, ALL_LANES) * vset1(alpha[r]);
        for (int j = 0; j < units; j++) {
            vunits vv[OUT_CHUNKS];
            UNROLLED
            for (int c = 0; c < OUT_CHUNKS; c++)
                vv[c] = load_units(values + j * HEAD_DIM + d + c * LANES);
            UNROLLED
            for (int r = 0; r < ROW_TILE; r++) {
                const vunits pp = broadcast_unit(probs[r * KEY_UNITS + j]);
                UNROLLED
                for (int c = 0; c < OUT_CHUNKS; c++) out[r][c] = dot_units(out[r][c], pp, vv[c]);
            }
        }
        UNROLLED
        for (int r = 0; r < ROW_TILE; r++)
            UNROLLED
            for (int c = 0; c < OUT_CHUNKS; c++)
                store_floats(t->o[r] + d + c * LANES, out[r][c], ALL_LANES);
    }
}

/* tile_step specialised for the vectors of keys of the block that the tile sees, rounded up
 * to 2 or 4 (probabilities are stored two vectors at a time), and for whether any computed
 * key is hidden from a row. */
static void tile_block(const Tile *t, const unit *keys, const unit *values, int64_t first,
                       float qk_scale, unit *probs) {
    const int64_t last = t->last_key[ROW_TILE - 1];
    const int64_t needed = (last - first) / LANES + 1;
    const int masked = first + KEY_BLOCK - 1 > t->last_key[0];
    if (!masked) tile_step(t, keys, values, first, qk_scale, KEY_VECTORS, 0, probs);
    else if (needed <= 2) tile_step(t, keys, values, first, qk_scale, 2, 1, probs);
    else tile_step(t, keys, values, first, qk_scale, KEY_VECTORS, 1, probs);
}

/* Rows [0, ITEM_ROWS) of an item: (position, head) = (first + r / GROUP, r % GROUP), rows
 * past the real ones repeating the last real row (computed, never stored). */
static void item_attention(const ELEM *q, int64_t q_stride, const unit *keys,
                           const unit *values, int64_t first, int64_t positions,
                           int64_t offset, float qk_scale, float *scratch, ELEM *out,
                           int64_t out_stride) {
    float *o = scratch, *max = o + ITEM_ROWS * HEAD_DIM, *sum = max + ITEM_ROWS;
    unit *probs = (unit *)(sum + ITEM_ROWS);
    const int64_t real = positions * GROUP;
    Tile tiles[ITEM_ROWS / ROW_TILE];
    for (int r = 0; r < ITEM_ROWS; r++) {
        const int64_t row = r < real ? r : real - 1;
        const int64_t position = first + row / GROUP;
        Tile *t = &tiles[r / ROW_TILE];
        const int i = r % ROW_TILE;
        t->q[i] = (const unit *)(q + position * q_stride + row % GROUP * HEAD_DIM);
        t->last_key[i] = offset + position;
        t->o[i] = o + r * HEAD_DIM, t->max[i] = max + r, t->sum[i] = sum + r;
        max[r] = -__builtin_inff(), sum[r] = 0.0f;
        for (int d = 0; d < HEAD_DIM; d++) o[r * HEAD_DIM + d] = 0.0f;
    }
    const int64_t last = offset + first + positions - 1;
    for (int64_t block = 0; block * KEY_BLOCK <= last; block++) {
        const unit *kb = keys + block * ROW_UNITS * KEY_BLOCK;
        const unit *vb = values + block * KEY_UNITS * HEAD_DIM;
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
    const int64_t head_units = blocks * KEY_BLOCK * ROW_UNITS; /* per head, K or V */
    const int64_t item_floats = /* outputs, max, sum, then the probabilities' units */
        (ITEM_ROWS * (HEAD_DIM + 2) + ROW_TILE * KEY_UNITS + 15) / 16 * 16;
    unit *packed = aligned_alloc(64, (size_t)(2 * kv_heads * head_units) * sizeof(unit));
    float *scratch = aligned_alloc(64, (size_t)(threads * item_floats) * sizeof(float));
    if (packed == NULL || scratch == NULL) {
        free(packed);
        free(scratch);
        return -1;
    }
    unit *keys = packed, *values = packed + kv_heads * head_units;
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
            unit *dst = (job % 2 ? values : keys) + head * head_units
                        + block * KEY_BLOCK * ROW_UNITS;
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
            item_attention(q + head * GROUP * HEAD_DIM, q_stride, keys + head * head_units,
                           values + head * head_units, first, positions, offset, qk_scale,
                           mine, out + head * GROUP * HEAD_DIM, heads_stride);
        }
    }
    free(packed);
    free(scratch);
    return 0;
}
