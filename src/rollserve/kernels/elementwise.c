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

/* Rotary embedding (rotary_head) on q in place, then each token's k and v rows into the KV
 * pool at its slot, k rotated there: one pass where PyTorch takes two rotary calls and two
 * index_put scatters. k and v are left as they were (nothing reads them after: attention
 * reads the pool). Layouts: q [tokens, heads, head_dim], k and v [tokens, kv_heads,
 * head_dim], rows of each their own stride apart, each row's heads contiguous; cos and sin
 * [tokens, head_dim]; k_cache and v_cache [kv_heads, pool_slots, head_dim] (one layer of the
 * pool); slots [tokens], each < pool_slots, all distinct. */
void rotary_store_kv(ELEM *q, const ELEM *k, const ELEM *v, const ELEM *cos, const ELEM *sin,
                     ELEM *k_cache, ELEM *v_cache, const int64_t *slots, int64_t tokens,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_stride,
                     int64_t k_stride, int64_t v_stride, int64_t pool_slots, int threads) {
    const size_t row_bytes = (size_t)head_dim * sizeof(ELEM);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const ELEM *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) rotary_head(q + t * q_stride + h * head_dim, c, s, head_dim);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t row = (h * pool_slots + slots[t]) * head_dim;
            memcpy(k_cache + row, k + t * k_stride + h * head_dim, row_bytes);
            rotary_head(k_cache + row, c, s, head_dim);
            memcpy(v_cache + row, v + t * v_stride + h * head_dim, row_bytes);
        }
    }
}
