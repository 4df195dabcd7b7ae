/* Next tokens for rows that sample without top-k/top-p/min-p filtering: the first maximum
 * where the temperature is 0 (greedy), else a draw from softmax(logits / temperature) by
 * inverse CDF, reading the logits in place (bfloat16 or float32, see simd.h).
 *
 * The PyTorch path converts [rows, vocab] logits to float32, divides, takes a softmax and a
 * cumulative sum: five passes over ~40 MB at batch 128 and Qwen's 152k vocabulary. Here a
 * row costs a max pass and an exp pass, and rows run in parallel.
 *
 * Layouts: logits [rows, vocab] contiguous; temperatures [rows] float (0: greedy); draws
 * [rows] double in (0, 1]; out [rows] int64. NaN logits are never picked.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* Index of the first maximum of x (lanes keep their first maximum; ties go to the lowest
 * index across lanes); *max_out receives the maximum. */
static int64_t row_argmax(const ELEM *x, int64_t vocab, float *max_out) {
    vfloat best = vset1(-__builtin_inff());
    vint best_index = vint_set1(0), index = vint_iota();
    for (int64_t i = 0; i < vocab; i += LANES) {
        const vmask m = tail_mask(vocab - i);
        const vfloat v = load_elems(x + i, m);
        const vpred better = pred_and(mask_pred(m), vcmp(v, best, _CMP_GT_OQ));
        best = vselect(better, v, best);
        best_index = vselect_int(better, index, best_index);
        index = vint_add(index, vint_set1(LANES));
    }
    const float top = reduce_max(best);
    const vpred at_top = vcmp(best, vset1(top), _CMP_EQ_OQ);
    *max_out = top;
    /* at_top is never empty: top is not NaN */
    return reduce_min_int(vselect_int(at_top, best_index, vint_set1(INT32_MAX)));
}

/* exp((x - top) / temperature) for LANES tokens from i. Exactly 0 for lanes past the
 * vocabulary and for -inf (banned) or NaN logits, so those are never drawn. */
static inline vfloat block_weights(const ELEM *x, int64_t i, int64_t vocab, float top,
                                   float inv_t) {
    const vmask m = tail_mask(vocab - i);
    const vfloat v = load_elems(x + i, m);
    const vpred live = pred_and(mask_pred(m), vcmp(v, vset1(-__builtin_inff()), _CMP_NEQ_OQ));
    return vselect(live, vexp((v - vset1(top)) * vset1(inv_t)), vzero());
}

/* The first token whose cumulative weight reaches draw * total. block_sums has one entry per
 * LANES tokens; the walk skips whole blocks, then goes token by token inside the one that
 * crosses. Rounding may leave the target just out of reach inside that block: the block's
 * last token with weight is taken then. */
static int64_t row_draw(const ELEM *x, int64_t vocab, float top, float inv_t, double draw,
                        float *block_sums) {
    const int64_t blocks = (vocab + LANES - 1) / LANES;
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        block_sums[b] = reduce_add(block_weights(x, b * LANES, vocab, top, inv_t));
        total += block_sums[b];
    }
    const double target = draw * total;
    double cumulative = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        if (cumulative + block_sums[b] < target && b + 1 < blocks) {
            cumulative += block_sums[b];
            continue;
        }
        float w[LANES];
        store_floats(w, block_weights(x, b * LANES, vocab, top, inv_t), ALL_LANES);
        int64_t last = -1;
        for (int j = 0; j < LANES && b * LANES + j < vocab; j++) {
            if (w[j] <= 0.0f) continue;
            last = b * LANES + j;
            cumulative += w[j];
            if (cumulative >= target) return last;
        }
        if (last >= 0) return last;
    }
    return -1; /* unreachable: the maximum's own weight is 1 */
}

/* Returns 0, or -1 when scratch memory cannot be had (nothing is written then). */
int sample_rows(const ELEM *logits, int64_t rows, int64_t vocab, const float *temperatures,
                const double *draws, int64_t *out, int threads) {
    /* block sums per thread, rounded up to 16 floats: each thread's 64 B aligned */
    const int64_t stride = ((vocab + LANES - 1) / LANES + 15) / 16 * 16;
    float *scratch = aligned_alloc(64, (size_t)(threads * stride) * sizeof(float));
    if (scratch == NULL) return -1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; r++) {
        const ELEM *x = logits + r * vocab;
        float top;
        const int64_t argmax = row_argmax(x, vocab, &top);
        if (temperatures[r] <= 0.0f || !(top > -__builtin_inff())) {
            out[r] = argmax;
            continue;
        }
        const int64_t drawn = row_draw(x, vocab, top, 1.0f / temperatures[r], draws[r],
                                       scratch + omp_get_thread_num() * stride);
        out[r] = drawn >= 0 ? drawn : argmax;
    }
    free(scratch);
    return 0;
}
