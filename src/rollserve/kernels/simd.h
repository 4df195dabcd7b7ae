/* The vector layer the kernels are written against, in two implementations: AVX-512 (16
 * float32 lanes) and AVX2 + FMA (8 lanes). The instruction set a kernel is compiled for
 * chooses (build.ISA_FLAGS: -mavx512f defines __AVX512F__; -mavx2 -mfma define __AVX2__ and
 * __FMA__), so one kernel source builds for either.
 *
 * A block is LANES ELEMs in, LANES float32 lanes out, and back. ELEM is uint16_t holding
 * bfloat16 (ELEM_IS_BF16=1) or float; the including kernel is compiled with both macros
 * defined. Rounding to bfloat16 is round-to-nearest-even, as PyTorch rounds every bfloat16
 * op's float32 result; NaN stays NaN.
 *
 * Arithmetic on vfloat is written with C operators (GCC vector types: one instruction per
 * operator, never fused under -ffp-contract=off); vfmadd fuses where a kernel asks for it.
 * Both implementations give the same bits lane for lane (vexp included); only the order of a
 * reduction across lanes depends on LANES.
 */
#ifndef ROLLSERVE_SIMD_H
#define ROLLSERVE_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* For loops over a kernel's accumulators (heads, rows of a tile, vectors of a row): unrolled,
 * GCC keeps them in registers; rolled, it stored every one to the stack on every step of the
 * dot-product loops it sat in (seen in the assembly of the prefill and decode attention). */
#define UNROLLED _Pragma("GCC unroll 16")

#if defined(__AVX512F__)

#define LANES 16
#define VREGS 32 /* architectural vector registers */
typedef __m512 vfloat;
typedef __m512i vint;   /* int32 lanes */
typedef __mmask16 vmask; /* the lanes a load or store touches */
typedef __mmask16 vpred; /* a per-lane predicate */
#define ALL_LANES ((vmask)0xffff)

/* Lanes [0, remaining) of a block. */
static inline vmask tail_mask(int64_t remaining) {
    return remaining >= LANES ? ALL_LANES : (vmask)((1u << remaining) - 1u);
}
static inline vpred mask_pred(vmask m) { return m; }

static inline vfloat vset1(float x) { return _mm512_set1_ps(x); }
static inline vfloat vzero(void) { return _mm512_setzero_ps(); }
static inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
static inline vfloat vmin(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
static inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
static inline vfloat vfnmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fnmadd_ps(a, b, c); }

/* Predicates: _CMP_* as for _mm512_cmp_ps_mask. */
#define vcmp(a, b, predicate) _mm512_cmp_ps_mask((a), (b), (predicate))
static inline vpred pred_and(vpred a, vpred b) { return a & b; }
static inline vfloat vselect(vpred p, vfloat if_true, vfloat if_false) {
    return _mm512_mask_blend_ps(p, if_false, if_true);
}

static inline vint vint_set1(int32_t x) { return _mm512_set1_epi32(x); }
static inline vint vint_iota(void) {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
static inline vint vint_add(vint a, vint b) { return _mm512_add_epi32(a, b); }
static inline vint vselect_int(vpred p, vint if_true, vint if_false) {
    return _mm512_mask_blend_epi32(p, if_false, if_true);
}

static inline float reduce_add(vfloat x) { return _mm512_reduce_add_ps(x); }
static inline float reduce_max(vfloat x) { return _mm512_reduce_max_ps(x); }
static inline int32_t reduce_min_int(vint x) { return _mm512_reduce_min_epi32(x); }

/* Masked-off lanes read as 0 and touch no memory. */
static inline vfloat load_floats(const float *p, vmask m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void store_floats(float *p, vfloat x, vmask m) { _mm512_mask_storeu_ps(p, m, x); }

#if ELEM_IS_BF16
static inline vfloat load_elems(const ELEM *p, vmask m) {
    const __m256i half = m == ALL_LANES ? _mm256_loadu_si256((const __m256i *)p)
                                        : _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline vint bf16_bits(vfloat x) { /* high halves hold the rounded bfloat16 */
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __m512i quiet_nan = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, quiet_nan);
}

static inline vfloat round_elems(vfloat x) {
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(x), _mm512_set1_epi32((int)0xffff0000)));
}

static inline void store_elems(ELEM *p, vfloat x, vmask m) {
    const __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(x), 16));
    if (m == ALL_LANES) _mm256_storeu_si256((__m256i *)p, half);
    else _mm256_mask_storeu_epi16(p, m, half);
}
#endif

static inline vfloat round_to_integer(vfloat x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* p * 2^n, n integral. */
static inline vfloat scale_pow2(vfloat p, vfloat n) { return _mm512_scalef_ps(p, n); }

/* 16x16 float transpose in registers: afterwards r[d] holds column d (lane j = old row j). */
static inline void transpose_block(vfloat r[LANES]) {
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

#elif defined(__AVX2__) && defined(__FMA__)

#define LANES 8
#define VREGS 16
typedef __m256 vfloat;
typedef __m256i vint;
/* AVX2 has no masked 16-bit loads: a mask is the count of lanes touched, and tails go
 * through a stack copy (a full block, the common case, is one plain load). */
typedef int vmask;
typedef __m256 vpred; /* all ones in a true lane */
#define ALL_LANES LANES

static inline vmask tail_mask(int64_t remaining) {
    return remaining >= LANES ? ALL_LANES : (vmask)remaining;
}

static inline vfloat vset1(float x) { return _mm256_set1_ps(x); }
static inline vfloat vzero(void) { return _mm256_setzero_ps(); }
static inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
static inline vfloat vmin(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
static inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
static inline vfloat vfnmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fnmadd_ps(a, b, c); }

#define vcmp(a, b, predicate) _mm256_cmp_ps((a), (b), (predicate))
static inline vpred pred_and(vpred a, vpred b) { return _mm256_and_ps(a, b); }
static inline vfloat vselect(vpred p, vfloat if_true, vfloat if_false) {
    return _mm256_blendv_ps(if_false, if_true, p);
}

static inline vint vint_set1(int32_t x) { return _mm256_set1_epi32(x); }
static inline vint vint_iota(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
static inline vint vint_add(vint a, vint b) { return _mm256_add_epi32(a, b); }
static inline vint vselect_int(vpred p, vint if_true, vint if_false) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(if_false), _mm256_castsi256_ps(if_true), p));
}

static inline vpred mask_pred(vmask m) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(m), vint_iota()));
}

static inline float reduce_add(vfloat x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float reduce_max(vfloat x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline int32_t reduce_min_int(vint x) {
    __m128i s = _mm_min_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    s = _mm_min_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_min_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

/* Masked-off lanes read as 0 and touch no memory (vmaskmov faults on no masked-off lane). */
static inline vfloat load_floats(const float *p, vmask m) {
    if (m == ALL_LANES) return _mm256_loadu_ps(p);
    return _mm256_maskload_ps(p, _mm256_castps_si256(mask_pred(m)));
}
static inline void store_floats(float *p, vfloat x, vmask m) {
    if (m == ALL_LANES) _mm256_storeu_ps(p, x);
    else _mm256_maskstore_ps(p, _mm256_castps_si256(mask_pred(m)), x);
}

#if ELEM_IS_BF16
static inline vfloat widen_bf16(const ELEM *p) { /* 8 bfloat16 at p, as float32 */
    const __m128i half = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline vfloat load_elems(const ELEM *p, vmask m) {
    if (m == ALL_LANES) return widen_bf16(p);
    ELEM part[LANES] = {0};
    memcpy(part, p, (size_t)m * sizeof(ELEM));
    return widen_bf16(part);
}

static inline vint bf16_bits(vfloat x) { /* high halves hold the rounded bfloat16 */
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    return vselect_int(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), quiet_nan, rounded);
}

static inline vfloat round_elems(vfloat x) {
    return _mm256_castsi256_ps(_mm256_and_si256(bf16_bits(x), _mm256_set1_epi32((int)0xffff0000)));
}

static inline void store_elems(ELEM *p, vfloat x, vmask m) {
    const __m256i bits = _mm256_srli_epi32(bf16_bits(x), 16); /* < 2^16: packus keeps them */
    const __m128i half = _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                          _mm256_extracti128_si256(bits, 1));
    if (m == ALL_LANES) {
        _mm_storeu_si128((__m128i *)p, half);
        return;
    }
    ELEM part[LANES];
    _mm_storeu_si128((__m128i *)part, half);
    memcpy(p, part, (size_t)m * sizeof(ELEM));
}
#endif

static inline vfloat round_to_integer(vfloat x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* 2^e for integral e in [-126, 127], built in the exponent field. */
static inline vfloat pow2(__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

/* p * 2^n for integral n in [-126, 128] (vexp's range) with p near 1, equal to AVX-512's
 * scalef: two steps of at most 2^64 keep each power of two a normal float, the first
 * product is exact, and the second rounds once (to a subnormal, or to inf) as scalef does. */
static inline vfloat scale_pow2(vfloat p, vfloat n) {
    const __m256i e = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(e, 1);
    return p * pow2(half) * pow2(_mm256_sub_epi32(e, half));
}

/* 8x8 float transpose in registers: afterwards r[d] holds column d (lane j = old row j). */
static inline void transpose_block(vfloat r[LANES]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2f128_ps(s[j], s[j + 4], 0x20);
        r[j + 4] = _mm256_permute2f128_ps(s[j], s[j + 4], 0x31);
    }
}

#else
#error "simd.h needs AVX-512 or AVX2 + FMA (build.ISA_FLAGS)"
#endif

#if !ELEM_IS_BF16
static inline vfloat load_elems(const ELEM *p, vmask m) { return load_floats(p, m); }
static inline vfloat round_elems(vfloat x) { return x; }
static inline void store_elems(ELEM *p, vfloat x, vmask m) { store_floats(p, x, m); }
#endif

/* exp(x) in float32 (Cephes' polynomial, ~1 ulp); saturates to 0 and +inf at the ends. */
static inline vfloat vexp(vfloat x) {
    x = vmin(vmax(x, vset1(-87.5f)), vset1(88.8f));
    const vfloat n = round_to_integer(x * vset1(1.44269504088896341f));
    vfloat r = vfnmadd(n, vset1(0.693359375f), x);
    r = vfnmadd(n, vset1(-2.12194440e-4f), r);
    vfloat p = vset1(1.9875691500e-4f);
    p = vfmadd(p, r, vset1(1.3981999507e-3f));
    p = vfmadd(p, r, vset1(8.3334519073e-3f));
    p = vfmadd(p, r, vset1(4.1665795894e-2f));
    p = vfmadd(p, r, vset1(1.6666665459e-1f));
    p = vfmadd(p, r, vset1(5.0000001201e-1f));
    p = vfmadd(p, r * r, r + vset1(1.0f));
    return scale_pow2(p, n);
}

#endif
