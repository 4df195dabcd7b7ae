/* All-reduce (sum) and all-gather between the tensor-parallel ranks of one machine through a
 * shared-memory region, in place of gloo's TCP loopback (a round trip through the kernel per
 * collective: ~270 us each, 49 of them per step).
 *
 * Region layout (every rank maps the same file):
 *   header: one 64-byte line per rank holding `arrived[rank]` (uint64), then one line holding
 *           `aborted` (uint64);
 *   slots:  2 parities x `size` ranks, `slot_bytes` each.
 *
 * Protocol, per chunk (a collective larger than a slot runs in chunks): a rank takes the
 * next sequence number s (each rank counts its own collectives; all ranks run the same
 * collectives in the same order, so their s agree), copies its chunk into its slot of parity
 * s % 2, publishes arrived[rank] = s (release), waits until arrived[r] >= s for every r
 * (acquire), then reads every rank's slot of that parity.
 * Invariant: a rank writes its parity-p slot for s only after seeing every arrived[r] >= s-1,
 * and a rank arrives at s-1 only after it finished reading the slots of s-2, the last users
 * of parity p; so no slot is overwritten while another rank still reads it.
 *
 * Every rank sums the slots in rank order, in float32, rounding once to ELEM: all ranks get
 * the same bits.
 *
 * A waiting rank gives up (returns -1) when `aborted` is set (rank 0's watcher sets it when a
 * rank exits) or when its parent is no longer `parent` (rank 0 died: ranks are its
 * children); it spins briefly, then yields, then sleeps, so that a rank whose peer is
 * descheduled does not take that peer's core.
 */
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "simd.h"

#define LINE 64
#define SPIN_NS 50000LL      /* busy-wait this long, then yield */
#define YIELD_NS 2000000LL   /* yield this long, then sleep */
#define CHECK_EVERY 256      /* waits between checks of the clock and the parent */

typedef struct {
    char *base;
    int rank, size;
    int64_t slot_bytes;
    int64_t parent; /* the pid rank 0 has (ranks > 0 check it is still their parent) */
} Region;

static volatile uint64_t *arrived(const Region *g, int rank) {
    return (volatile uint64_t *)(g->base + (int64_t)rank * LINE);
}

static volatile uint64_t *aborted(const Region *g) {
    return (volatile uint64_t *)(g->base + (int64_t)g->size * LINE);
}

static char *slot(const Region *g, uint64_t seq, int rank) {
    const int64_t header = (int64_t)(g->size + 1) * LINE;
    return g->base + header + ((int64_t)(seq & 1) * g->size + rank) * g->slot_bytes;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int broken(const Region *g) {
    return __atomic_load_n(aborted(g), __ATOMIC_ACQUIRE) ||
           (g->rank > 0 && (int64_t)getppid() != g->parent);
}

/* Publish arrival at `seq` and wait for every rank's; 0, or -1 when the group is broken. */
static int meet(const Region *g, uint64_t seq) {
    __atomic_store_n(arrived(g, g->rank), seq, __ATOMIC_RELEASE);
    const int64_t start = now_ns();
    for (int r = 0; r < g->size; r++) {
        for (int64_t waits = 0; __atomic_load_n(arrived(g, r), __ATOMIC_ACQUIRE) < seq; waits++) {
            if (waits % CHECK_EVERY) {
                _mm_pause();
                continue;
            }
            if (broken(g)) return -1;
            const int64_t waited = now_ns() - start;
            if (waited > YIELD_NS) {
                const struct timespec nap = {0, 20000};
                nanosleep(&nap, 0);
            } else if (waited > SPIN_NS) {
                sched_yield();
            }
        }
    }
    return 0;
}

static Region region(void *base, int rank, int size, int64_t slot_bytes, int64_t parent) {
    const Region g = {(char *)base, rank, size, slot_bytes, parent};
    return g;
}

/* data[0, n) = the sum over the ranks of their data[0, n); *seq counts this rank's chunks. */
int all_reduce(void *base, int rank, int size, int64_t slot_bytes, int64_t parent,
               uint64_t *seq, ELEM *data, int64_t n) {
    const Region g = region(base, rank, size, slot_bytes, parent);
    const int64_t per_chunk = slot_bytes / (int64_t)sizeof(ELEM);
    for (int64_t first = 0; first < n; first += per_chunk) {
        const int64_t count = n - first < per_chunk ? n - first : per_chunk;
        const uint64_t s = ++*seq;
        memcpy(slot(&g, s, rank), data + first, (size_t)count * sizeof(ELEM));
        if (meet(&g, s)) return -1;
        for (int64_t i = 0; i < count; i += LANES) {
            const vmask m = tail_mask(count - i);
            vfloat sum = load_elems((const ELEM *)slot(&g, s, 0) + i, m);
            for (int r = 1; r < size; r++) sum = sum + load_elems((const ELEM *)slot(&g, s, r) + i, m);
            store_elems(data + first + i, round_elems(sum), m);
        }
    }
    return 0;
}

/* out[row] = every rank's src[row] side by side in rank order: src is [rows, row_bytes],
 * out [rows, size * row_bytes]. row_bytes <= slot_bytes. */
int all_gather_rows(void *base, int rank, int size, int64_t slot_bytes, int64_t parent,
                    uint64_t *seq, const char *src, char *out, int64_t rows, int64_t row_bytes) {
    const Region g = region(base, rank, size, slot_bytes, parent);
    const int64_t per_chunk = slot_bytes / row_bytes;
    for (int64_t first = 0; first < rows; first += per_chunk) {
        const int64_t count = rows - first < per_chunk ? rows - first : per_chunk;
        const uint64_t s = ++*seq;
        memcpy(slot(&g, s, rank), src + first * row_bytes, (size_t)(count * row_bytes));
        if (meet(&g, s)) return -1;
        for (int r = 0; r < size; r++) {
            const char *part = slot(&g, s, r);
            for (int64_t i = 0; i < count; i++)
                memcpy(out + ((first + i) * size + r) * row_bytes, part + i * row_bytes,
                       (size_t)row_bytes);
        }
    }
    return 0;
}

/* Mark the group broken: every rank waiting in a collective, or entering one, gives up. */
void abort_group(void *base, int size) {
    __atomic_store_n((volatile uint64_t *)((char *)base + (int64_t)size * LINE), 1,
                     __ATOMIC_RELEASE);
}
