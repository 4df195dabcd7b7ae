/* Fused elementwise layers of the decoder on CPU: one pass over memory where PyTorch's eager
 * ops make five to eight, with the same roundings as those ops.
 *
 * ELEM is uint16_t for bfloat16 storage (ELEM_IS_BF16=1) or float. Every value is computed in
 * float32 and rounded to ELEM exactly where the PyTorch reference rounds (each eager op
 * rounds its output to the tensor dtype), so results equal the eager path's up to the
 * summation order of the RMS and the last bit of exp().
 *
 * Rows are split across `threads` OpenMP threads; within a row, LANES at a time (simd.h).
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
        vfloat squares = vzero();
        for (int64_t i = 0; i < size; i += LANES) {
            const vmask m = tail_mask(size - i);
            vfloat v = load_elems(in + i, m);
            if (res) {
                v = round_elems(v + load_elems(res + i, m));
                store_elems(res + i, v, m);
            }
            squares = vfmadd(v, v, squares);
        }
        const float mean = reduce_add(squares) / (float)size;
        const vfloat inv_rms = vset1(1.0f / __builtin_sqrtf(mean + eps));
        const ELEM *src = res ? res : in;
        for (int64_t i = 0; i < size; i += LANES) {
            const vmask m = tail_mask(size - i);
            const vfloat normed = round_elems(load_elems(src + i, m) * inv_rms);
            store_elems(out + r * size + i, load_elems(weight + i, m) * normed, m);
        }
    }
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
            const vfloat g = load_elems(gate + i, m);
            const vfloat silu = g / (vset1(1.0f) + vexp(vzero() - g));
            store_elems(dst + i, round_elems(silu) * load_elems(up + i, m), m);
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
            for (int64_t i = 0; i < half; i += LANES) {
                const vmask m = tail_mask(half - i);
                const vfloat a = load_elems(v + i, m), b = load_elems(v + half + i, m);
                const vfloat first = round_elems(a * load_elems(c + i, m))
                                     + round_elems((vzero() - b) * load_elems(s + i, m));
                const vfloat second = round_elems(b * load_elems(c + half + i, m))
                                      + round_elems(a * load_elems(s + half + i, m));
                store_elems(v + i, first, m);
                store_elems(v + half + i, second, m);
            }
        }
    }
}
