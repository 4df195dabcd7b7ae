/* y = x W^T (+ bias) in bfloat16 with AMX tiles, for the few-row matmuls of decode steps.
 *
 * At a handful of rows a decode step's matmuls are a stream over the weights: the time is
 * the time to read them. oneDNN reaches 50-70% of this machine's read bandwidth there; this
 * kernel reads W once, in its own [n, k] layout (no packed copy), and keeps the next block's
 * lines in flight with software prefetches: in memory order and into L2, which reads at
 * ~30 GB/s here against ~26 GB/s for prefetching the lines the next tile loads will touch.
 *
 * The roles are swapped against the usual AMX GEMM, so that W needs no repacking: the A
 * tile is 16 rows of W (16 n x 32 k, row-major as stored), the B tile is x in the pair-
 * interleaved layout AMX wants (16 k-pairs x 16 m), and C = A B is y^T for a 16 n x 16 m
 * block. x is small and is rearranged once per call.
 *
 * Every output element accumulates its k-chunks in the same order whatever the number of
 * rows, so a row's result does not depend on the other rows of the batch.
 *
 * Layouts (row-major, contiguous): x [m, k], w [n, k], bias [n] or NULL, y [m, n];
 * k a multiple of 32, n a multiple of 16 (the caller checks).
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

#if LANES != 16
#error "amx_linear.c is written for 16-lane AVX-512 vectors (every AMX CPU has AVX-512)"
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_BYTES 1024 /* 16 rows x 64 bytes */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* 0 when this CPU has AMX-BF16 and the kernel let this process use tile data. */
int amx_enable(void) {
    unsigned int eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    const unsigned int amx_bf16 = 1u << 22, amx_tile = 1u << 24;
    if ((edx & (amx_bf16 | amx_tile)) != (amx_bf16 | amx_tile)) return -1;
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

static void configure_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* Rows [16 mb, 16 mb + 16) x columns [kc, kc + 32) of x into one B tile: row p holds the
 * pair (x[., kc + 2p], x[., kc + 2p + 1]) of each of the 16 rows. Rows past m are zero. */
static void pack_x_chunk(const uint16_t *x, int64_t m, int64_t k, int64_t mb, int64_t kc,
                         uint16_t *tile) {
    __m512 rows[16];
    for (int i = 0; i < 16; i++) {
        const int64_t row = mb * 16 + i;
        rows[i] = row < m ? _mm512_loadu_ps((const float *)(x + row * k + kc)) : _mm512_setzero_ps();
    }
    transpose_block(rows); /* 32-bit lanes: a lane is one bf16 pair */
    for (int p = 0; p < 16; p++) _mm512_store_ps((float *)(tile + p * 32), rows[p]);
}

/* A C tile [16 n][16 m] (float) into y[m0.., n0 .. n0 + 16), bias added, rounded to bf16. */
static void store_block(const float *c, const uint16_t *bias, uint16_t *y, int64_t n, int64_t n0,
                        int64_t m0, int64_t m) {
    __m512 rows[16];
    for (int i = 0; i < 16; i++) rows[i] = _mm512_load_ps(c + i * 16);
    transpose_block(rows);
    const __m512 b = bias ? load_elems(bias + n0, ALL_LANES) : _mm512_setzero_ps();
    for (int i = 0; i < 16 && m0 + i < m; i++)
        store_elems(y + (m0 + i) * n + n0, _mm512_add_ps(rows[i], b), ALL_LANES);
}

/* C[a][b] = W rows [16 a ..] x (x block b) for a < n_blocks, b < m_blocks (each 1 or 2),
 * tiles: 0-3 C (a * 2 + b), 4-5 A, 6-7 B. The next W block, `next_bytes` contiguous bytes at
 * `next` (NULL and 0: none), is prefetched a 32-line slice per k-chunk: a 32-row block is exactly
 * k / 32 such slices, so it is all in flight by the time this block is done. */
static void multiply_block(const uint16_t *w, const uint16_t *xv, int64_t k, int n_blocks,
                           int m_blocks, const char *next, int64_t next_bytes, float *c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t stride = k * 2;
    for (int64_t kc = 0; kc < k; kc += 32) {
        for (int64_t line = kc * 64; line < kc * 64 + 2048 && line < next_bytes; line += 64)
            _mm_prefetch(next + line, _MM_HINT_T1);
        _tile_loadd(4, w + kc, stride);
        _tile_loadd(6, xv + kc * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (m_blocks == 2) {
            _tile_loadd(7, xv + 16 * k + kc * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (n_blocks == 2) {
            _tile_loadd(5, w + 16 * k + kc, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (m_blocks == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    /* All four are stored: a C tile this block does not use stays zero and is never read. */
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
}

/* Returns 0, or -1 when scratch memory cannot be had (y is not written then). */
int amx_linear(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
               int64_t m, int64_t n, int64_t k, int threads) {
    const int64_t m_blocks = (m + 15) / 16, n_blocks = n / 16, k_chunks = k / 32;
    const int64_t n_pairs = (n_blocks + 1) / 2;
    uint16_t *xv = aligned_alloc(64, (size_t)(m_blocks * k_chunks) * TILE_BYTES);
    if (xv == NULL) return -1;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t i = t; i < m_blocks * k_chunks; i += nt)
            pack_x_chunk(x, m, k, i / k_chunks, (i % k_chunks) * 32, xv + i * (TILE_BYTES / 2));
#pragma omp barrier
        configure_tiles();
        float c[4 * 256] __attribute__((aligned(64)));
        /* Each thread owns a contiguous run of W row pairs: one forward stream. */
        const int64_t first = n_pairs * t / nt, last = n_pairs * (t + 1) / nt;
        for (int64_t pair = first; pair < last; pair++) {
            const int64_t nb = pair * 2;
            const int nbs = nb + 1 < n_blocks ? 2 : 1;
            for (int64_t mb = 0; mb < m_blocks; mb += 2) {
                const int mbs = mb + 1 < m_blocks ? 2 : 1;
                /* Later passes over this block find it in cache; the first fetches the next. */
                const int64_t next_nb = nb + 2;
                const int64_t next_rows = pair + 1 < last && mb == 0 ? (next_nb + 1 < n_blocks ? 32 : 16) : 0;
                const char *next = next_rows ? (const char *)(w + next_nb * 16 * k) : NULL;
                multiply_block(w + nb * 16 * k, xv + mb * 16 * k, k, nbs, mbs, next, next_rows * k * 2, c);
                for (int a = 0; a < nbs; a++)
                    for (int b = 0; b < mbs; b++)
                        store_block(c + (a * 2 + b) * 256, bias, y, n, (nb + a) * 16, (mb + b) * 16, m);
            }
        }
        _tile_release();
    }
    free(xv);
    return 0;
}
