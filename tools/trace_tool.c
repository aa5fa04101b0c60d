/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc-trace-tool: reads allocation traces written by
 * libtensoralloc-trace.so (docs/trace-format.md).
 *
 *   tensoralloc-trace-tool info FILE [--png OUT.png] [--dump]
 *   tensoralloc-trace-tool replay FILE [--touch]
 *
 * A file is read and checked whole before anything is done with it: a
 * truncated or corrupt file is reported with the offset where it went
 * wrong and never replayed half-way. replay repeats the calls with the
 * recorded thread structure (a block freed by another thread than the one
 * that made it waits until it exists) under whatever allocator is loaded,
 * and reports time, peak RSS and RSS at the end. Its own bookkeeping is
 * mapped with mmap, so a traced replay shows the replayed calls only.
 */
#define _GNU_SOURCE
#include "trace/trace_format.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    uint64_t seq, time;
    uint32_t thread;
    uint8_t kind;
    uint64_t size, align, id, old_id;
} event_t;

typedef struct {
    event_t *ev;
    size_t count;
    uint32_t threads;
    uint64_t max_id;
    uint32_t pid;
} trace_t;

static void *map_zero(size_t bytes)
{
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "tensoralloc-trace: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static const char *path_of;

static _Noreturn void corrupt(uint64_t off, const char *why)
{
    fprintf(stderr, "tensoralloc-trace: %s: corrupt at offset %llu: %s; nothing was replayed\n",
            path_of, (unsigned long long)off, why);
    exit(3);
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static bool get_varint(const unsigned char **p, const unsigned char *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*p >= end)
            return false;
        unsigned char b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

static int by_seq(const void *a, const void *b)
{
    const event_t *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static int values_of(unsigned kind)
{
    switch (kind) {
    case TA_EV_MEMALIGN:
    case TA_EV_ALIGNED_ALLOC:
    case TA_EV_POSIX_MEMALIGN:
    case TA_EV_REALLOC: return 3;
    case TA_EV_FREE:
    case TA_EV_RSS: return 1;
    default: return 2;
    }
}

static void load(const char *path, trace_t *t)
{
    path_of = path;
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fprintf(stderr, "tensoralloc-trace: %s: %s\n", path, strerror(errno));
        exit(2);
    }
    size_t size = (size_t)st.st_size;
    if (size < TA_TRACE_HEADER_BYTES)
        corrupt(size, "file shorter than the 32-byte header");
    unsigned char *data = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (data == MAP_FAILED)
        corrupt(0, "cannot map the file");
    if (memcmp(data, TA_TRACE_MAGIC, 8) != 0)
        corrupt(0, "not a tensoralloc trace (bad magic)");
    uint32_t version = get_u32(data + 8);
    if (version != TA_TRACE_VERSION) {
        fprintf(stderr,
                "tensoralloc-trace: %s: trace format version %u; this tool reads version %u "
                "only (record the program again)\n",
                path, version, TA_TRACE_VERSION);
        exit(3);
    }
    if (get_u32(data + 12) != TA_TRACE_HEADER_BYTES)
        corrupt(12, "bad header size");
    t->pid = get_u32(data + 24);
    /* first pass: count events and check the chunk structure */
    size_t count = 0;
    for (size_t off = TA_TRACE_HEADER_BYTES; off < size;) {
        if (size - off < TA_TRACE_CHUNK_HEADER_BYTES)
            corrupt(off, "truncated chunk header");
        if (get_u32(data + off) != TA_TRACE_CHUNK_MAGIC)
            corrupt(off, "bad chunk magic");
        uint32_t len = get_u32(data + off + 4);
        if (len > size - off - TA_TRACE_CHUNK_HEADER_BYTES)
            corrupt(off + 4, "chunk runs past the end of the file (truncated trace?)");
        if (get_u32(data + off + 32) !=
            ta_trace_checksum(data + off + TA_TRACE_CHUNK_HEADER_BYTES, len))
            corrupt(off, "chunk checksum does not match its contents");
        count += get_u32(data + off + 12);
        off += TA_TRACE_CHUNK_HEADER_BYTES + len;
    }
    t->ev = map_zero((count ? count : 1) * sizeof *t->ev);
    size_t n = 0;
    for (size_t off = TA_TRACE_HEADER_BYTES; off < size;) {
        uint32_t len = get_u32(data + off + 4), thread = get_u32(data + off + 8);
        uint32_t events = get_u32(data + off + 12);
        uint64_t seq = get_u64(data + off + 16), time = get_u64(data + off + 24);
        const unsigned char *p = data + off + TA_TRACE_CHUNK_HEADER_BYTES, *end = p + len;
        for (uint32_t i = 0; i < events; i++) {
            uint64_t at = (uint64_t)(p - data);
            if (p >= end)
                corrupt(at, "chunk holds fewer events than its header says");
            unsigned kind = *p++;
            if (kind == 0 || kind >= TA_EV_KINDS_)
                corrupt(at, "unknown event kind");
            uint64_t dseq, dtime, v[3] = {0, 0, 0};
            if (!get_varint(&p, end, &dseq) || !get_varint(&p, end, &dtime))
                corrupt(at, "event cut short");
            for (int k = 0; k < values_of(kind); k++)
                if (!get_varint(&p, end, &v[k]))
                    corrupt(at, "event cut short");
            seq += dseq;
            time += dtime;
            event_t *e = &t->ev[n++];
            *e = (event_t){.seq = seq, .time = time, .thread = thread, .kind = (uint8_t)kind};
            switch (kind) {
            case TA_EV_MEMALIGN:
            case TA_EV_ALIGNED_ALLOC:
            case TA_EV_POSIX_MEMALIGN: e->size = v[0], e->align = v[1], e->id = v[2]; break;
            case TA_EV_REALLOC: e->old_id = v[0], e->size = v[1], e->id = v[2]; break;
            case TA_EV_FREE: e->old_id = v[0]; break;
            case TA_EV_RSS: e->size = v[0] * 1024; break;
            default: e->size = v[0], e->id = v[1];
            }
            if (thread + 1 > t->threads)
                t->threads = thread + 1;
            if (e->id > t->max_id)
                t->max_id = e->id;
        }
        if (p != end)
            corrupt((uint64_t)(p - data), "chunk has bytes after its last event");
        off += TA_TRACE_CHUNK_HEADER_BYTES + len;
    }
    munmap(data, size);
    t->count = n;
    qsort(t->ev, n, sizeof *t->ev, by_seq);
    /* every id is born once and dies at most once, after its birth */
    unsigned char *state = map_zero(t->max_id + 1); /* 0 unborn, 1 live, 2 dead */
    for (size_t i = 0; i < n; i++) {
        event_t *e = &t->ev[i];
        if (i && e->seq == t->ev[i - 1].seq)
            corrupt(0, "two events share a sequence number");
        if (e->old_id && e->old_id > t->max_id)
            corrupt(0, "a free names a block that was never allocated");
        if (e->old_id && e->old_id != e->id) {
            if (state[e->old_id] != 1)
                corrupt(0, state[e->old_id] ? "a block is freed twice"
                                            : "a block is freed before it exists");
            state[e->old_id] = 2;
        }
        if (e->id && e->id != e->old_id) {
            if (state[e->id])
                corrupt(0, "a block id is allocated twice");
            state[e->id] = 1;
        }
    }
    munmap(state, t->max_id + 1);
}

static const char *kind_name(unsigned k)
{
    static const char *names[] = {
        "?",        "malloc",        "calloc",         "realloc", "free",
        "memalign", "aligned_alloc", "posix_memalign", "valloc",  "pvalloc",
        "rss"};
    return k < TA_EV_KINDS_ ? names[k] : "?";
}

/* ---- info ------------------------------------------------------------------------ */

static int info(const trace_t *t, const char *png, bool dump)
{
    if (dump) { /* one line per call, in order (the tests compare these) */
        for (size_t i = 0; i < t->count; i++) {
            const event_t *e = &t->ev[i];
            if (e->kind == TA_EV_RSS)
                continue;
            printf("t%u %s size=%llu align=%llu id=%llu old=%llu\n", e->thread, kind_name(e->kind),
                   (unsigned long long)e->size, (unsigned long long)e->align,
                   (unsigned long long)e->id, (unsigned long long)e->old_id);
        }
        return 0;
    }
    uint64_t calls[TA_EV_KINDS_] = {0}, hist[64] = {0}, life[32] = {0};
    uint64_t *born = map_zero((t->max_id + 1) * sizeof *born);
    uint64_t *bytes = map_zero((t->max_id + 1) * sizeof *bytes);
    uint64_t live = 0, peak = 0, peak_time = 0, total = 0;
    FILE *dat = NULL;
    char datpath[4096];
    if (png) {
        snprintf(datpath, sizeof datpath, "%s.dat", png);
        dat = fopen(datpath, "w");
    }
    uint64_t last_plot = 0, rss = 0;
    for (size_t i = 0; i < t->count; i++) {
        const event_t *e = &t->ev[i];
        calls[e->kind]++;
        if (e->kind == TA_EV_RSS) {
            rss = e->size;
        } else {
            if (e->old_id && e->old_id != e->id) {
                live -= bytes[e->old_id];
                uint64_t age = e->time - born[e->old_id];
                int b = 0;
                while ((1ULL << (b + 1)) * 1000 <= age && b < 31)
                    b++;
                life[b]++;
            }
            if (e->id && e->id != e->old_id) {
                live += e->size;
                bytes[e->id] = e->size;
                born[e->id] = e->time;
                total += e->size;
                int b = e->size ? 63 - __builtin_clzll(e->size) : 0;
                hist[b]++;
            }
            if (live > peak)
                peak = live, peak_time = e->time;
        }
        if (dat && (e->time - last_plot > 2000000 || i + 1 == t->count)) {
            fprintf(dat, "%.4f %.2f %.2f\n", (double)e->time / 1e9, (double)live / 1048576.0,
                    (double)rss / 1048576.0);
            last_plot = e->time;
        }
    }
    uint64_t n_calls = 0;
    for (int k = 1; k < TA_EV_KINDS_; k++)
        if (k != TA_EV_RSS)
            n_calls += calls[k];
    printf("trace of pid %u: %llu calls in %u threads over %.3f s\n", t->pid,
           (unsigned long long)n_calls, t->threads,
           t->count ? (double)t->ev[t->count - 1].time / 1e9 : 0.0);
    for (int k = 1; k < TA_EV_KINDS_; k++)
        if (calls[k])
            printf("  %-15s %llu\n", kind_name((unsigned)k), (unsigned long long)calls[k]);
    printf("bytes allocated in total %.1f MiB; peak live %.1f MiB at %.3f s; live at the end "
           "%.1f MiB\n",
           (double)total / 1048576, (double)peak / 1048576, (double)peak_time / 1e9,
           (double)live / 1048576);
    printf("size histogram (calls per power of two):\n");
    for (int b = 0; b < 64; b++)
        if (hist[b])
            printf("  %12llu - %-12llu %llu\n", (unsigned long long)(b ? 1ULL << b : 0),
                   (unsigned long long)((1ULL << (b + 1)) - 1), (unsigned long long)hist[b]);
    printf("lifetimes (frees per power of two of microseconds):\n");
    for (int b = 0; b < 32; b++)
        if (life[b])
            printf("  < %-10llu us  %llu\n", (unsigned long long)(1ULL << (b + 1)),
                   (unsigned long long)life[b]);
    if (dat) {
        fclose(dat);
        char cmd[9000];
        snprintf(cmd, sizeof cmd,
                 "gnuplot -e \"set terminal png size 1100,500; set output '%s'; "
                 "set xlabel 'seconds'; set ylabel 'MiB'; set grid; "
                 "set title 'live bytes and RSS over time'; "
                 "plot '%s' using 1:2 with lines lw 2 title 'live bytes', "
                 "'' using 1:3 with lines lw 2 title 'RSS'\"",
                 png, datpath);
        if (system(cmd) == 0)
            printf("chart: %s\n", png);
        else
            fprintf(stderr, "tensoralloc-trace: gnuplot failed; data in %s\n", datpath);
    }
    munmap(born, (t->max_id + 1) * sizeof *born);
    munmap(bytes, (t->max_id + 1) * sizeof *bytes);
    return 0;
}

/* ---- replay ------------------------------------------------------------------------- */

static const trace_t *rt;
static _Atomic(void *) *blocks; /* by id */
static void *const DEAD = (void *)1;
static bool touch;
static size_t page;
static atomic_int stuck;

typedef struct {
    size_t *idx; /* this thread's events, in order */
    size_t n;
} lane_t;

static void *wait_for(uint64_t id)
{
    void *p;
    for (long spins = 0; (p = atomic_load_explicit(&blocks[id], memory_order_acquire)) == NULL;
         spins++) {
        if (spins > 2000000000L / 64) { /* minutes: the trace cannot be replayed */
            atomic_store(&stuck, 1);
            return NULL;
        }
        if (spins > 64)
            sched_yield();
    }
    return p;
}

static void born(uint64_t id, void *p, size_t n)
{
    if (touch && p)
        for (size_t i = 0; i < n; i += page)
            ((volatile char *)p)[i] = 1;
    atomic_store_explicit(&blocks[id], p ? p : DEAD, memory_order_release);
}

static void *lane_main(void *arg)
{
    lane_t *l = arg;
    for (size_t k = 0; k < l->n && !atomic_load(&stuck); k++) {
        const event_t *e = &rt->ev[l->idx[k]];
        void *p = NULL;
        switch (e->kind) {
        case TA_EV_MALLOC: p = malloc(e->size); break;
        case TA_EV_CALLOC: p = calloc(1, e->size); break;
        case TA_EV_VALLOC: p = valloc(e->size); break;
        case TA_EV_PVALLOC: p = pvalloc(e->size); break;
        case TA_EV_MEMALIGN: p = memalign(e->align, e->size); break;
        case TA_EV_ALIGNED_ALLOC: p = aligned_alloc(e->align, e->size); break;
        case TA_EV_POSIX_MEMALIGN:
            if (posix_memalign(&p, e->align, e->size) != 0)
                p = NULL;
            break;
        case TA_EV_FREE:
            if (e->old_id) {
                void *q = wait_for(e->old_id);
                if (q && q != DEAD)
                    free(q);
                atomic_store(&blocks[e->old_id], DEAD);
            }
            continue;
        case TA_EV_REALLOC: {
            void *q = e->old_id ? wait_for(e->old_id) : NULL;
            if (q == DEAD)
                q = NULL;
            p = realloc(q, e->size);
            if (e->old_id && e->old_id != e->id)
                atomic_store(&blocks[e->old_id], DEAD);
            if (e->id && e->id != e->old_id)
                born(e->id, p, e->size);
            continue;
        }
        default: continue;
        }
        if (e->id)
            born(e->id, p, e->size);
        else if (p) /* failed when recorded: give it back at once */
            free(p);
    }
    return NULL;
}

static size_t status_bytes(const char *field)
{
    int f = open("/proc/self/status", O_RDONLY);
    char buf[4096];
    ssize_t n = f >= 0 ? read(f, buf, sizeof buf - 1) : -1;
    if (f >= 0)
        close(f);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    const char *s = strstr(buf, field);
    return s ? strtoull(s + strlen(field) + 1, NULL, 10) * 1024 : 0;
}

static int replay(const trace_t *t)
{
    rt = t;
    page = (size_t)sysconf(_SC_PAGESIZE);
    blocks = map_zero((t->max_id + 1) * sizeof *blocks);
    lane_t *lanes = map_zero(t->threads * sizeof *lanes);
    for (size_t i = 0; i < t->count; i++)
        lanes[t->ev[i].thread].n++;
    for (uint32_t k = 0; k < t->threads; k++) {
        lanes[k].idx = map_zero((lanes[k].n ? lanes[k].n : 1) * sizeof(size_t));
        lanes[k].n = 0;
    }
    for (size_t i = 0; i < t->count; i++) {
        lane_t *l = &lanes[t->ev[i].thread];
        l->idx[l->n++] = i;
    }
    size_t rss0 = status_bytes("VmRSS");
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_t *th = map_zero(t->threads * sizeof *th);
    for (uint32_t k = 1; k < t->threads; k++)
        pthread_create(&th[k], NULL, lane_main, &lanes[k]);
    if (t->threads)
        lane_main(&lanes[0]); /* the recorded main thread runs here */
    for (uint32_t k = 1; k < t->threads; k++)
        pthread_join(th[k], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (atomic_load(&stuck)) {
        fprintf(stderr, "tensoralloc-trace: replay stuck waiting for a block\n");
        return 4;
    }
    double wall = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
    size_t calls = 0;
    for (size_t i = 0; i < t->count; i++)
        calls += t->ev[i].kind != TA_EV_RSS;
    /* the replay's own bookkeeping goes before the end figures */
    for (uint32_t k = 0; k < t->threads; k++)
        munmap(lanes[k].idx, (lanes[k].n ? lanes[k].n : 1) * sizeof(size_t));
    munmap(lanes, t->threads * sizeof *lanes);
    munmap(blocks, (t->max_id + 1) * sizeof *blocks);
    munmap(t->ev, (t->count ? t->count : 1) * sizeof *t->ev);
    size_t rss_end = status_bytes("VmRSS");
    sleep(1);
    printf("workload=replay\nwall_s=%.4f\ncalls=%zu\nthreads=%u\npeak_rss_mib=%.1f\n"
           "rss_start_mib=%.1f\nrss_end_mib=%.1f\nrss_1s_mib=%.1f\n",
           wall, calls, t->threads, (double)status_bytes("VmHWM") / 1048576, (double)rss0 / 1048576,
           (double)rss_end / 1048576, (double)status_bytes("VmRSS") / 1048576);
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: tensoralloc-trace-tool info FILE [--png OUT.png] [--dump]\n"
                    "       tensoralloc-trace-tool replay FILE [--touch]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *png = NULL;
    bool dump = false;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--png") && i + 1 < argc)
            png = argv[++i];
        else if (!strcmp(argv[i], "--dump"))
            dump = true;
        else if (!strcmp(argv[i], "--touch"))
            touch = true;
        else
            usage();
    }
    trace_t t = {0};
    if (!strcmp(argv[1], "info")) {
        load(argv[2], &t);
        return info(&t, png, dump);
    }
    if (!strcmp(argv[1], "replay")) {
        load(argv[2], &t);
        return replay(&t);
    }
    usage();
}
