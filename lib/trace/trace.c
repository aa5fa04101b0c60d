/* SPDX-License-Identifier: MIT */
/*
 * libtensoralloc-trace.so: an LD_PRELOAD library that records every call
 * of the malloc family (function, size, alignment, a stable id for each
 * block, the block freed or resized, thread, time) plus RSS samples, and
 * forwards each call to the allocator underneath through glibc's
 * __libc_* names (glibc itself, or any allocator preloaded after this one
 * that defines them: tensoralloc, jemalloc, mimalloc, tcmalloc).
 *
 * Events go into per-thread buffers (mapped with mmap: the tracer never
 * calls malloc) and are written to TENSORALLOC_TRACE_FILE in chunks. The
 * format is documented in docs/trace-format.md. A global sequence number
 * orders events across threads; ids are assigned under a lock from an
 * address table, so a block's id is known to whoever frees it.
 */
#define _GNU_SOURCE
#include "trace_format.h"

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
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define TLS __thread __attribute__((tls_model("initial-exec")))

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern char **environ;

/* ---- state ------------------------------------------------------------------ */

#define BUF_BYTES (64 << 10)

typedef struct tbuf_s {
    struct tbuf_s *next; /* all buffers, for the flush at exit */
    uint32_t thread;
    uint32_t count;
    uint64_t base_seq, base_time, last_seq, last_time;
    size_t used;
    atomic_int busy; /* held by its thread while appending, by exit while flushing */
    unsigned char data[BUF_BYTES];
} tbuf_t;

static atomic_int state; /* 0 new, 1 starting, 2 tracing, 3 off */
static int fd = -1;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t list_lock = PTHREAD_MUTEX_INITIALIZER;
static tbuf_t *all_bufs;
static atomic_uint_fast64_t seq_counter, id_counter;
static atomic_uint thread_counter;
static uint64_t t0_ns;
static atomic_uint_fast64_t last_rss_ns;
static char path_buf[4096];

static TLS tbuf_t *my_buf;
static TLS int in_tracer; /* our own calls into libc must not be traced */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static void put_u64(unsigned char *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static void write_all(const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        p += n;
        len -= (size_t)n;
    }
}

static void write_header(void)
{
    unsigned char h[TA_TRACE_HEADER_BYTES] = {0};
    memcpy(h, TA_TRACE_MAGIC, 8);
    put_u32(h + 8, TA_TRACE_VERSION);
    put_u32(h + 12, TA_TRACE_HEADER_BYTES);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    put_u64(h + 16, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
    put_u32(h + 24, (uint32_t)getpid());
    write_all(h, sizeof h);
}

static const char *env(const char *name)
{
    size_t len = strlen(name);
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
            return *e + len + 1;
    return NULL;
}

/* Opens the trace file; called once, on the first traced call. */
static void start(void)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&state, &expected, 1)) {
        while (atomic_load(&state) == 1)
            ;
        return;
    }
    const char *path = environ ? env("TENSORALLOC_TRACE_FILE") : NULL;
    if (!path || !*path || strlen(path) >= sizeof path_buf) {
        atomic_store(&state, environ ? 3 : 0); /* before environ: try again later */
        return;
    }
    strcpy(path_buf, path);
    /* The first process takes FILE; programs it executes inherit the
     * variable and write FILE.<pid> instead of overwriting it. */
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EEXIST) {
        /* Ours already if this process wrote it before an exec. */
        unsigned char h[TA_TRACE_HEADER_BYTES];
        int r = open(path, O_RDONLY | O_CLOEXEC);
        uint32_t owner = 0;
        if (r >= 0 && read(r, h, sizeof h) == (ssize_t)sizeof h)
            memcpy(&owner, h + 24, 4);
        if (r >= 0)
            close(r);
        if (owner == (uint32_t)getpid()) {
            fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
        } else {
            char alt[4200];
            snprintf(alt, sizeof alt, "%s.%d", path, (int)getpid());
            fd = open(alt, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        }
    }
    if (fd < 0) {
        atomic_store(&state, 3);
        return;
    }
    t0_ns = now_ns();
    write_header();
    atomic_store(&state, 2);
}

static void flush_locked(tbuf_t *b);

/* A thread's buffer is flushed when the thread exits. */
static pthread_key_t exit_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void thread_done(void *arg)
{
    tbuf_t *b = arg;
    while (atomic_exchange(&b->busy, 1))
        ;
    flush_locked(b);
    atomic_store(&b->busy, 0);
}

static void make_key(void)
{
    pthread_key_create(&exit_key, thread_done);
}

/* Called with in_tracer set: what libc allocates here is not traced. */
static tbuf_t *buffer(void)
{
    tbuf_t *b = my_buf;
    if (b)
        return b;
    void *m = mmap(NULL, sizeof *b, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    b = m;
    b->thread = atomic_fetch_add(&thread_counter, 1);
    pthread_mutex_lock(&list_lock);
    b->next = all_bufs;
    all_bufs = b;
    pthread_mutex_unlock(&list_lock);
    my_buf = b;
    pthread_once(&key_once, make_key);
    pthread_setspecific(exit_key, b);
    return b;
}

static void flush_locked(tbuf_t *b)
{
    if (b->count == 0)
        return;
    unsigned char h[TA_TRACE_CHUNK_HEADER_BYTES];
    put_u32(h, TA_TRACE_CHUNK_MAGIC);
    put_u32(h + 4, (uint32_t)b->used);
    put_u32(h + 8, b->thread);
    put_u32(h + 12, b->count);
    put_u64(h + 16, b->base_seq);
    put_u64(h + 24, b->base_time);
    put_u32(h + 32, ta_trace_checksum(b->data, b->used));
    put_u32(h + 36, 0);
    pthread_mutex_lock(&write_lock);
    write_all(h, sizeof h);
    write_all(b->data, b->used);
    pthread_mutex_unlock(&write_lock);
    b->used = 0;
    b->count = 0;
}

static unsigned char *put_varint(unsigned char *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (unsigned char)v;
    return p;
}

/* Appends one event: kind, then up to three values. seq orders it. */
static void record(unsigned kind, uint64_t seq, uint64_t a, uint64_t b2, uint64_t c, int nvals)
{
    tbuf_t *b = buffer();
    if (!b)
        return;
    while (atomic_exchange(&b->busy, 1))
        ;
    if (b->used + 64 > BUF_BYTES)
        flush_locked(b);
    uint64_t t = now_ns() - t0_ns;
    if (b->count == 0) {
        b->base_seq = b->last_seq = seq;
        b->base_time = b->last_time = t;
    }
    unsigned char *p = b->data + b->used;
    *p++ = (unsigned char)kind;
    p = put_varint(p, seq - b->last_seq);
    p = put_varint(p, t >= b->last_time ? t - b->last_time : 0);
    uint64_t v[3] = {a, b2, c};
    for (int i = 0; i < nvals; i++)
        p = put_varint(p, v[i]);
    b->last_seq = seq;
    b->last_time = t >= b->last_time ? t : b->last_time;
    b->used = (size_t)(p - b->data);
    b->count++;
    atomic_store(&b->busy, 0);
}

/* ---- the address -> id table (open addressing, mapped memory) -------------- */

typedef struct {
    uintptr_t addr; /* 0 empty, 1 deleted */
    uint64_t id;
} slot_t;

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static slot_t *table;
static size_t table_cap, table_used, table_tomb;

static size_t hash(uintptr_t a)
{
    return (size_t)((a >> 4) * 0x9E3779B97F4A7C15ULL >> 17);
}

static void table_grow(void)
{
    size_t cap = table_cap ? table_cap * 2 : (1 << 16);
    if (table_used * 4 < table_cap) /* mostly tombstones: rehash same size */
        cap = table_cap;
    slot_t *t =
        mmap(NULL, cap * sizeof *t, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (t == MAP_FAILED)
        return;
    for (size_t i = 0; i < table_cap; i++)
        if (table[i].addr > 1) {
            size_t j = hash(table[i].addr) & (cap - 1);
            while (t[j].addr)
                j = (j + 1) & (cap - 1);
            t[j] = table[i];
        }
    if (table)
        munmap(table, table_cap * sizeof *table);
    table = t;
    table_cap = cap;
    table_tomb = 0;
}

static void id_put(void *p, uint64_t id)
{
    pthread_mutex_lock(&table_lock);
    if ((table_used + table_tomb + 1) * 10 > table_cap * 7)
        table_grow();
    if (table) {
        size_t j = hash((uintptr_t)p) & (table_cap - 1);
        while (table[j].addr > 1)
            j = (j + 1) & (table_cap - 1);
        if (table[j].addr == 1)
            table_tomb--;
        table[j] = (slot_t){(uintptr_t)p, id};
        table_used++;
    }
    pthread_mutex_unlock(&table_lock);
}

/* Removes p and returns its id; 0 for a block the tracer never saw. */
static uint64_t id_take(void *p)
{
    uint64_t id = 0;
    pthread_mutex_lock(&table_lock);
    if (table) {
        size_t j = hash((uintptr_t)p) & (table_cap - 1);
        for (; table[j].addr; j = (j + 1) & (table_cap - 1))
            if (table[j].addr == (uintptr_t)p) {
                id = table[j].id;
                table[j].addr = 1;
                table_used--;
                table_tomb++;
                break;
            }
    }
    pthread_mutex_unlock(&table_lock);
    return id;
}

/* ---- RSS samples ---------------------------------------------------------------- */

static void maybe_sample_rss(void)
{
    uint64_t t = now_ns();
    uint64_t last = atomic_load_explicit(&last_rss_ns, memory_order_relaxed);
    if (t - last < 10000000u || !atomic_compare_exchange_strong(&last_rss_ns, &last, t))
        return;
    char buf[128];
    int f = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    if (f < 0)
        return;
    ssize_t n = read(f, buf, sizeof buf - 1);
    close(f);
    if (n <= 0)
        return;
    buf[n] = 0;
    const char *s = buf;
    while (*s && *s != ' ')
        s++;
    uint64_t pages = 0;
    for (s++; *s >= '0' && *s <= '9'; s++)
        pages = pages * 10 + (uint64_t)(*s - '0');
    record(TA_EV_RSS, atomic_fetch_add(&seq_counter, 1), pages * (uint64_t)getpagesize() / 1024, 0,
           0, 1);
}

/* ---- the traced calls ----------------------------------------------------------------- */

static inline bool tracing(void)
{
    int s = atomic_load_explicit(&state, memory_order_acquire);
    if (s == 0)
        start(), s = atomic_load(&state);
    return s == 2 && !in_tracer;
}

/* An allocation returned p: give it an id and record it. */
static void *allocated(unsigned kind, void *p, size_t size, size_t align)
{
    if (!tracing())
        return p;
    in_tracer = 1;
    uint64_t id = 0;
    if (p) {
        id = atomic_fetch_add(&id_counter, 1) + 1;
        id_put(p, id);
    }
    uint64_t seq = atomic_fetch_add(&seq_counter, 1);
    if (align)
        record(kind, seq, size, align, id, 3);
    else
        record(kind, seq, size, id, 0, 2);
    maybe_sample_rss();
    in_tracer = 0;
    return p;
}

EXPORT void *malloc(size_t n)
{
    return allocated(TA_EV_MALLOC, __libc_malloc(n), n, 0);
}

EXPORT void *calloc(size_t c, size_t n)
{
    size_t total;
    void *p = __libc_calloc(c, n);
    if (__builtin_mul_overflow(c, n, &total))
        total = SIZE_MAX;
    return allocated(TA_EV_CALLOC, p, total, 0);
}

EXPORT void free(void *p)
{
    if (!p)
        return;
    if (tracing()) {
        in_tracer = 1;
        /* the id is released and the event numbered before the block can be
         * reused by another thread */
        uint64_t id = id_take(p);
        record(TA_EV_FREE, atomic_fetch_add(&seq_counter, 1), id, 0, 0, 1);
        in_tracer = 0;
    }
    __libc_free(p);
}

EXPORT void *realloc(void *old, size_t n)
{
    if (!tracing())
        return __libc_realloc(old, n);
    in_tracer = 1;
    uint64_t old_id = old ? id_take(old) : 0;
    in_tracer = 0;
    void *p = __libc_realloc(old, n);
    in_tracer = 1;
    uint64_t id = 0;
    if (p) {
        id = atomic_fetch_add(&id_counter, 1) + 1;
        id_put(p, id);
    } else if (old && n) { /* failed: the old block lives on */
        id_put(old, old_id);
        id = old_id;
    }
    record(TA_EV_REALLOC, atomic_fetch_add(&seq_counter, 1), old_id, n, id, 3);
    in_tracer = 0;
    return p;
}

EXPORT void *reallocarray(void *old, size_t c, size_t n)
{
    size_t total;
    if (__builtin_mul_overflow(c, n, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(old, total);
}

EXPORT void *memalign(size_t a, size_t n)
{
    return allocated(TA_EV_MEMALIGN, __libc_memalign(a, n), n, a);
}

EXPORT void *aligned_alloc(size_t a, size_t n)
{
    return allocated(TA_EV_ALIGNED_ALLOC, __libc_memalign(a, n), n, a);
}

EXPORT int posix_memalign(void **out, size_t a, size_t n)
{
    if (a == 0 || (a & (a - 1)) || a % sizeof(void *))
        return EINVAL;
    int saved = errno;
    void *p = __libc_memalign(a, n);
    errno = saved;
    allocated(TA_EV_POSIX_MEMALIGN, p, n, a);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

EXPORT void *valloc(size_t n)
{
    return allocated(TA_EV_VALLOC, __libc_memalign((size_t)getpagesize(), n), n, 0);
}

EXPORT void *pvalloc(size_t n)
{
    size_t page = (size_t)getpagesize();
    size_t r = (n + page - 1) & ~(page - 1);
    return allocated(TA_EV_PVALLOC, __libc_memalign(page, r ? r : page), n, 0);
}

/* ---- thread exit, fork, process exit ---------------------------------------------------- */

/* Registering the thread-exit flush may allocate: done outside tracing. */
__attribute__((constructor)) static void trace_init(void)
{
    in_tracer = 1;
    pthread_once(&key_once, make_key);
    in_tracer = 0;
    if (atomic_load(&state) == 0)
        start();
}

/* In a child, the parent's buffered events are not the child's: drop them
 * and trace to FILE.<pid> from here on. */
static void fork_child(void)
{
    for (tbuf_t *b = all_bufs; b; b = b->next) {
        b->used = 0;
        b->count = 0;
        atomic_store(&b->busy, 0);
    }
    pthread_mutex_init(&write_lock, NULL);
    pthread_mutex_init(&list_lock, NULL);
    pthread_mutex_init(&table_lock, NULL);
    if (atomic_load(&state) != 2)
        return;
    close(fd);
    char path[4200];
    snprintf(path, sizeof path, "%s.%d", path_buf, (int)getpid());
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        atomic_store(&state, 3);
        return;
    }
    write_header();
}

static void fork_prepare(void)
{
    pthread_mutex_lock(&table_lock);
    pthread_mutex_lock(&list_lock);
    pthread_mutex_lock(&write_lock);
}

static void fork_parent(void)
{
    pthread_mutex_unlock(&write_lock);
    pthread_mutex_unlock(&list_lock);
    pthread_mutex_unlock(&table_lock);
}

__attribute__((constructor(101))) static void trace_atfork(void)
{
    in_tracer = 1;
    pthread_atfork(fork_prepare, fork_parent, fork_child);
    in_tracer = 0;
}

/* At exit, every thread's events go out. */
__attribute__((destructor)) static void trace_fini(void)
{
    if (atomic_load(&state) != 2)
        return;
    pthread_mutex_lock(&list_lock);
    for (tbuf_t *b = all_bufs; b; b = b->next) {
        while (atomic_exchange(&b->busy, 1))
            ;
        flush_locked(b);
        atomic_store(&b->busy, 0);
    }
    pthread_mutex_unlock(&list_lock);
    atomic_store(&state, 3);
}
