/* The elementwise layers of the decoder for one row (or head), with the roundings of the eager
 * PyTorch ops they replace: every value is computed in float32 and rounded to ELEM exactly
 * where the PyTorch reference rounds (each eager op rounds its output to the tensor dtype),
 * so results equal the eager path's up to the summation order of the RMS and the last bit
 * of exp(). elementwise.c runs them over rows in parallel; decode_layers.c inside a layer.
 */
#ifndef ROLLSERVE_ELEMENTWISE_H
#define ROLLSERVE_ELEMENTWISE_H

#include "simd.h"

/* out = weight * round(x / rms(x)), rms in float32 (as Llama/Qwen's RMSNorm). With
 * `residual`: first residual = round(x + residual) and normalise that (the residual add that
 * precedes every norm after the first). out may alias x. */
static inline void rms_norm_row(const ELEM *x, ELEM *residual, const ELEM *weight, ELEM *out,
                                int64_t size, float eps) {
    vfloat squares = vzero();
    for (int64_t i = 0; i < size; i += LANES) {
        const vmask m = tail_mask(size - i);
        vfloat v = load_elems(x + i, m);
        if (residual) {
            v = round_elems(v + load_elems(residual + i, m));
            store_elems(residual + i, v, m);
        }
        squares = vfmadd(v, v, squares);
    }
    const float mean = reduce_add(squares) / (float)size;
    const vfloat inv_rms = vset1(1.0f / __builtin_sqrtf(mean + eps));
    const ELEM *src = residual ? residual : x;
    for (int64_t i = 0; i < size; i += LANES) {
        const vmask m = tail_mask(size - i);
        const vfloat normed = round_elems(load_elems(src + i, m) * inv_rms);
        store_elems(out + i, load_elems(weight + i, m) * normed, m);
    }
}

/* round(silu(gate)) * up, still to be rounded by the caller: SwiGLU's product. */
static inline vfloat silu_mul(vfloat gate, vfloat up) {
    return round_elems(gate / (vset1(1.0f) + vexp(vzero() - gate))) * up;
}

/* One head of head_dim values rotated in place (halves rotate, as HF's rotate_half):
 * v = round(round(v * cos) + round(rotate_half(v) * sin)), cos and sin already in ELEM. */
static inline void rotary_head(ELEM *v, const ELEM *cos, const ELEM *sin, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i += LANES) {
        const vmask m = tail_mask(half - i);
        const vfloat a = load_elems(v + i, m), b = load_elems(v + half + i, m);
        const vfloat first = round_elems(a * load_elems(cos + i, m))
                             + round_elems((vzero() - b) * load_elems(sin + i, m));
        const vfloat second = round_elems(b * load_elems(cos + half + i, m))
                              + round_elems(a * load_elems(sin + half + i, m));
        store_elems(v + i, first, m);
        store_elems(v + half + i, second, m);
    }
}

#endif
