/* Fused elementwise layers of the decoder on CPU: one pass over memory where PyTorch's eager
 * ops make five to eight, with the same roundings as those ops (elementwise.h).
 *
 * ELEM is uint16_t for bfloat16 storage (ELEM_IS_BF16=1) or float. Rows are split across
 * `threads` OpenMP threads; within a row, LANES at a time (simd.h).
 */
#include <stdint.h>

#include "elementwise.h"

/* rms_norm_row over `rows` rows of `size`; residual may be NULL. */
void rms_norm(const ELEM *x, ELEM *residual, const ELEM *weight, ELEM *out, int64_t rows,
              int64_t size, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        rms_norm_row(x + r * size, residual ? residual + r * size : 0, weight, out + r * size,
                     size, eps);
}

/* out = round(round(silu(gate)) * up), where gate_up is [rows, 2 * size] with each row's gate
 * first and up second (the fused gate_up projection's output) and out [rows, size]: the
 * MLP's SwiGLU. */
void silu_and_mul(const ELEM *gate_up, ELEM *out, int64_t rows, int64_t size, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const ELEM *gate = gate_up + 2 * r * size, *up = gate + size;
        ELEM *dst = out + r * size;
        for (int64_t i = 0; i < size; i += LANES) {
            const vmask m = tail_mask(size - i);
            store_elems(dst + i, silu_mul(load_elems(gate + i, m), load_elems(up + i, m)), m);
        }
    }
}

/* Rotary embedding in place on x [tokens, heads, head_dim] (rows token_stride apart), with
 * cos and sin [tokens, head_dim] already rounded to ELEM: rotary_head on every head. */
void rotary(ELEM *x, const ELEM *cos, const ELEM *sin, int64_t tokens, int64_t heads,
            int64_t head_dim, int64_t token_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++)
            rotary_head(x + t * token_stride + h * head_dim, cos + t * head_dim,
                        sin + t * head_dim, head_dim);
}
