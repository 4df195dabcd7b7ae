/* Decode attention for a batch of sequences, one (sequence, KV head) item at a time in
 * parallel (the items and the layouts: decode_attention.h). */
#include <omp.h>
#include <stdlib.h>

#include "decode_attention.h"

/* Returns 0, or -1 when scratch memory cannot be had (nothing is written then). */
int decode_attention(const ELEM *q, const ELEM *k, const ELEM *v, int64_t pool_slots,
                     const int64_t *kv_slots, int64_t max_len, const int64_t *kv_lens,
                     ELEM *out, int64_t n, int64_t kv_heads, float scale, int threads) {
    const int64_t items = n * kv_heads;
    const int64_t stride = (GROUP * max_len + 15) / 16 * 16; /* floats per thread, 64 B aligned */
    float *scratch = aligned_alloc(64, (size_t)(threads * stride) * sizeof(float));
    if (scratch == NULL) return -1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < items; item++) {
        float *scores = scratch + omp_get_thread_num() * stride;
        const int64_t seq = item / kv_heads, head = item % kv_heads;
        const int64_t len = kv_lens[seq];
        const int64_t *slots = kv_slots + seq * max_len;
        const int64_t qrow = (seq * kv_heads + head) * GROUP * HEAD_DIM;
        attend_item(q + qrow, k + head * pool_slots * HEAD_DIM, v + head * pool_slots * HEAD_DIM,
                    slots, len, scale, scores, out + qrow);
    }
    free(scratch);
    return 0;
}
