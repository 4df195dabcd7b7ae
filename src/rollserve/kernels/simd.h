/* AVX-512 helpers shared by the kernels: 16 ELEMs in, 16 float32 lanes out, and back.
 *
 * ELEM is uint16_t holding bfloat16 (ELEM_IS_BF16=1) or float; the including kernel is
 * compiled with both macros defined. Rounding to bfloat16 is round-to-nearest-even, as
 * PyTorch rounds every bfloat16 op's float32 result; NaN stays NaN.
 */
#ifndef ROLLSERVE_SIMD_H
#define ROLLSERVE_SIMD_H

#include <immintrin.h>
#include <stdint.h>

/* Lanes [0, remaining) of a 16-lane block. */
static inline __mmask16 tail_mask(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << remaining) - 1u);
}

/* Masked-off lanes read as 0 and touch no memory. */
static inline __m512 load16(const ELEM *p, __mmask16 mask) {
#if ELEM_IS_BF16
    __m256i half = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
#else
    return _mm512_maskz_loadu_ps(mask, p);
#endif
}

#if ELEM_IS_BF16
static inline __m512i bf16_bits(__m512 x) { /* high halves hold the rounded bfloat16 */
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __m512i quiet_nan = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, quiet_nan);
}
#endif

/* x rounded to ELEM precision, still as float32 (for chains of rounded ops). */
static inline __m512 round16(__m512 x) {
#if ELEM_IS_BF16
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(x), _mm512_set1_epi32(0xffff0000)));
#else
    return x;
#endif
}

static inline void store16(ELEM *p, __m512 x, __mmask16 mask) {
#if ELEM_IS_BF16
    __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(x), 16));
    _mm256_mask_storeu_epi16(p, mask, half);
#else
    _mm512_mask_storeu_ps(p, mask, x);
#endif
}

/* exp(x) in float32 (Cephes' polynomial, ~1 ulp); saturates to 0 and +inf at the ends. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.5f)), _mm512_set1_ps(88.8f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* 16x16 float transpose in registers: afterwards r[d] holds column d (lane j = old row j). */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

#endif
