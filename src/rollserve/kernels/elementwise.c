/* Fused elementwise layers of the decoder on CPU: one pass over memory where PyTorch's eager
 * ops make five to eight, with the same roundings as those ops.
 *
 * ELEM is uint16_t for bfloat16 storage (ELEM_IS_BF16=1) or float. Every value is computed in
 * float32 and rounded to ELEM exactly where the PyTorch reference rounds (each eager op
 * rounds its output to the tensor dtype), so results equal the eager path's up to the
 * summation order of the RMS and the last bit of exp().
 *
 * Rows are split across `threads` OpenMP threads; within a row, 16 lanes at a time.
 */
#include <stdint.h>

#include "simd.h"

/* out[r] = weight * round(x[r] / rms(x[r])), rms in float32 (as Llama/Qwen's RMSNorm).
 * With `residual`: first residual[r] = round(x[r] + residual[r]) and normalise that (the
 * residual add that precedes every norm after the first). out may alias x. */
void rms_norm(const ELEM *x, ELEM *residual, const ELEM *weight, ELEM *out, int64_t rows,
              int64_t size, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const ELEM *in = x + r * size;
        ELEM *res = residual ? residual + r * size : 0;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < size; i += 16) {
            const __mmask16 m = tail_mask(size - i);
            __m512 v = load16(in + i, m);
            if (res) {
                v = round16(_mm512_add_ps(v, load16(res + i, m)));
                store16(res + i, v, m);
            }
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const float mean = _mm512_reduce_add_ps(squares) / (float)size;
        const __m512 inv_rms = _mm512_set1_ps(1.0f / __builtin_sqrtf(mean + eps));
        const ELEM *src = res ? res : in;
        for (int64_t i = 0; i < size; i += 16) {
            const __mmask16 m = tail_mask(size - i);
            __m512 normed = round16(_mm512_mul_ps(load16(src + i, m), inv_rms));
            store16(out + r * size + i, _mm512_mul_ps(load16(weight + i, m), normed), m);
        }
    }
}

/* gate = round(round(silu(gate)) * up) in place, both [rows, size] (the MLP's SwiGLU). */
void silu_mul(ELEM *gate, const ELEM *up, int64_t rows, int64_t size, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = r * size; i < (r + 1) * size; i += 16) {
            const __mmask16 m = tail_mask((r + 1) * size - i);
            const __m512 g = load16(gate + i, m);
            const __m512 silu = _mm512_div_ps(
                g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store16(gate + i, _mm512_mul_ps(round16(silu), load16(up + i, m)), m);
        }
    }
}

/* Rotary embedding in place on x [tokens, heads, head_dim] (rows token_stride apart; halves
 * rotate, as HF's rotate_half): x = round(round(x * cos) + round(rotate_half(x) * sin)), with
 * cos and sin [tokens, head_dim] already rounded to ELEM. */
void rotary(ELEM *x, const ELEM *cos, const ELEM *sin, int64_t tokens, int64_t heads,
            int64_t head_dim, int64_t token_stride, int threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const ELEM *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            ELEM *v = x + t * token_stride + h * head_dim;
            for (int64_t i = 0; i < half; i += 16) {
                const __mmask16 m = tail_mask(half - i);
                const __m512 a = load16(v + i, m), b = load16(v + half + i, m);
                const __m512 first = _mm512_add_ps(
                    round16(_mm512_mul_ps(a, load16(c + i, m))),
                    round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b),
                                          load16(s + i, m))));
                const __m512 second = _mm512_add_ps(
                    round16(_mm512_mul_ps(b, load16(c + half + i, m))),
                    round16(_mm512_mul_ps(a, load16(s + half + i, m))));
                store16(v + i, first, m);
                store16(v + half + i, second, m);
            }
        }
    }
}
