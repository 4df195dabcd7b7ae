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
#include <stdlib.h>

#include "simd.h"

/* Index of the first maximum of x (lanes keep their first maximum; ties go to the lowest
 * index across lanes); *max_out receives the maximum. */
static int64_t row_argmax(const ELEM *x, int64_t vocab, float *max_out) {
    __m512 best = _mm512_set1_ps(-__builtin_inff());
    __m512i best_index = _mm512_set1_epi32(0);
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t i = 0; i < vocab; i += 16) {
        const __m512 v = load16(x + i, tail_mask(vocab - i));
        const __mmask16 better = _mm512_mask_cmp_ps_mask(tail_mask(vocab - i), v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, better, v);
        best_index = _mm512_mask_mov_epi32(best_index, better, index);
        index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
    }
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 at_top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    const __m512i candidates = _mm512_mask_mov_epi32(_mm512_set1_epi32(0x7fffffff), at_top, best_index);
    *max_out = top;
    return _mm512_reduce_min_epi32(candidates); /* at_top is never empty: top is not NaN */
}

/* exp((x - top) / temperature) for 16 tokens from i. Exactly 0 for lanes past the
 * vocabulary and for -inf (banned) or NaN logits, so those are never drawn. */
static inline __m512 weights16(const ELEM *x, int64_t i, int64_t vocab, float top, float inv_t) {
    const __m512 v = load16(x + i, tail_mask(vocab - i));
    const __mmask16 live = _mm512_mask_cmp_ps_mask(tail_mask(vocab - i), v,
                                                   _mm512_set1_ps(-__builtin_inff()), _CMP_NEQ_OQ);
    const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(top)), _mm512_set1_ps(inv_t));
    return _mm512_maskz_mov_ps(live, exp16(scaled));
}

/* The first token whose cumulative weight reaches draw * total. block_sums has one entry per
 * 16 tokens; the walk skips whole blocks, then goes token by token inside the one that
 * crosses. Rounding may leave the target just out of reach inside that block: the block's
 * last token with weight is taken then. */
static int64_t row_draw(const ELEM *x, int64_t vocab, float top, float inv_t, double draw,
                        float *block_sums) {
    const int64_t blocks = (vocab + 15) / 16;
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        block_sums[b] = _mm512_reduce_add_ps(weights16(x, b * 16, vocab, top, inv_t));
        total += block_sums[b];
    }
    const double target = draw * total;
    double cumulative = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        if (cumulative + block_sums[b] < target && b + 1 < blocks) {
            cumulative += block_sums[b];
            continue;
        }
        float w[16];
        _mm512_storeu_ps(w, weights16(x, b * 16, vocab, top, inv_t));
        int64_t last = -1;
        for (int j = 0; j < 16 && b * 16 + j < vocab; j++) {
            if (w[j] <= 0.0f) continue;
            last = b * 16 + j;
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
    const int64_t stride = ((vocab + 15) / 16 + 15) / 16 * 16; /* floats per thread, 64 B aligned */
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
