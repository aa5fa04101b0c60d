/* SPDX-License-Identifier: MIT */
/*
 * The loader: a load is cut into units of work that reader threads take
 * in file order from one atomic counter, so the file is read front to
 * back by all of them at once (the kernel's readahead sees one stream).
 *
 * Buffered (the default): a unit is a chunk of one span, read by pread
 * straight into its destination; the kernel's copy out of the page cache
 * is the only copy. The destination is not prefaulted: MADV_POPULATE_WRITE
 * before each chunk's read was measured slower on fresh and on reused
 * blocks alike (docs/benchmarks.md "Loads"); the readers fault their own
 * chunks, in parallel.
 *
 * Mapped (TA_PAGE_CACHE_MAP): nothing is read; a unit is a chunk of the
 * file's mapping that a reader faults in with MADV_POPULATE_READ, so the
 * page cache's pages are mapped by several threads at once.
 *
 * Direct: a unit is an aligned range of the file read with O_DIRECT into
 * the reader's own aligned buffer, then copied to every span it covers
 * (O_DIRECT needs the buffer, offset and length aligned, and a tensor's
 * file offset and its block's address differ in their low bits). The page
 * cache is never filled, as llama.cpp's direct-I/O loads do.
 */
#include "loader.h"
#include "os/os.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DIRECT_ALIGN ((uint64_t)4096)

typedef struct {
    uint32_t span;
    uint64_t at; /* bytes into the span */
    size_t len;
} piece_t;

typedef struct {
    int fd;
    const _ta_span_t *spans;
    size_t nspans;
    size_t chunk;
    bool direct;
    /* buffered: the pieces; direct: the spans in file order and the range */
    piece_t *pieces;
    size_t npieces;
    uint32_t *order;
    uint64_t lo, hi;
    size_t nunits;
    _Atomic size_t next;
    _Atomic uint64_t reads;
    _Atomic int rc; /* the first failure; its message in why */
    char *why;
    size_t whylen;
} job_t;

static void job_fail(job_t *j, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void job_fail(job_t *j, int rc, const char *fmt, ...)
{
    int none = 0;
    if (atomic_compare_exchange_strong(&j->rc, &none, rc)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(j->why, j->whylen, fmt, ap);
        va_end(ap);
    }
}

/* Reads len bytes at off into dst; fewer only at the end of the file.
 * Direct reads (dst, off and len aligned) stay aligned: one that comes back
 * short goes on from the start of the block it ended in, not from where it
 * ended, since the legacy direct-I/O path and NFS refuse an unaligned read
 * with EINVAL. A direct read ends inside a block only at the end of the
 * file, so that block is read again once; a read that brings nothing past
 * what is done is the end of the file. */
static int read_span(job_t *j, void *dst, size_t len, uint64_t off, size_t *got)
{
    size_t done = 0;
    while (done < len) {
        size_t from = j->direct ? done & ~(size_t)(DIRECT_ALIGN - 1) : done, n;
        atomic_fetch_add_explicit(&j->reads, 1, memory_order_relaxed);
        int rc = _ta_os_read_at(j->fd, (char *)dst + from, len - from, off + from, &n);
        if (rc) {
            job_fail(j, rc, "read failed at offset %llu: %s", (unsigned long long)(off + from),
                     strerror(rc));
            return rc;
        }
        if (from + n <= done)
            break;
        done = from + n;
    }
    *got = done;
    return 0;
}

static void short_file(job_t *j, uint64_t at)
{
    job_fail(
        j, TA_EFORMAT,
        "file ends at offset %llu, before the tensors it declares do (it shrank during the load)",
        (unsigned long long)at);
}

static void buffered_unit(job_t *j, size_t u)
{
    const piece_t *p = &j->pieces[u];
    const _ta_span_t *s = &j->spans[p->span];
    char *dst = (char *)s->dst + p->at;
    size_t got;
    if (read_span(j, dst, p->len, s->off + p->at, &got) == 0 && got < p->len)
        short_file(j, s->off + p->at + got);
}

/* The first span, in file order, that ends after off. */
static size_t first_after(const job_t *j, uint64_t off)
{
    size_t lo = 0, hi = j->nspans;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const _ta_span_t *s = &j->spans[j->order[mid]];
        if (s->off + s->len <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void direct_unit(job_t *j, size_t u, unsigned char *buf)
{
    uint64_t a = j->lo + (uint64_t)u * j->chunk;
    uint64_t want = j->hi - a < j->chunk ? j->hi - a : j->chunk;
    size_t i = first_after(j, a);
    if (i == j->nspans || j->spans[j->order[i]].off >= a + want)
        return; /* a gap between spans */
    size_t got; /* a, len and buf (a page-aligned mapping) aligned, as read_span needs */
    size_t len = (size_t)((want + DIRECT_ALIGN - 1) & ~(DIRECT_ALIGN - 1));
    if (read_span(j, buf, len, a, &got) != 0)
        return;
    uint64_t end = a + got;
    for (; i < j->nspans; i++) {
        const _ta_span_t *s = &j->spans[j->order[i]];
        if (s->off >= a + want)
            break;
        uint64_t from = s->off > a ? s->off : a;
        uint64_t to = s->off + s->len < a + want ? s->off + s->len : a + want;
        if (to > end) {
            short_file(j, end);
            return;
        }
        char *dst = (char *)s->dst + (from - s->off);
        memcpy(dst, buf + (from - a), (size_t)(to - from));
    }
}

static void *reader(void *arg)
{
    job_t *j = arg;
    unsigned char *buf = NULL;
    if (j->direct && _ta_os_map(j->chunk, _ta_os_page_size(), (void **)&buf) != 0) {
        job_fail(j, ENOMEM, "no memory for a read buffer of %zu bytes", j->chunk);
        return NULL;
    }
    for (;;) {
        size_t u = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (u >= j->nunits || atomic_load_explicit(&j->rc, memory_order_relaxed))
            break;
        if (j->direct)
            direct_unit(j, u, buf);
        else
            buffered_unit(j, u);
    }
    if (buf)
        _ta_os_unmap(buf, j->chunk);
    return NULL;
}

static int cut_pieces(job_t *j)
{
    size_t n = 0;
    for (size_t i = 0; i < j->nspans; i++)
        n += (j->spans[i].len + j->chunk - 1) / j->chunk;
    if (!(j->pieces = malloc((n ? n : 1) * sizeof *j->pieces)))
        return ENOMEM;
    for (size_t i = 0; i < j->nspans; i++)
        for (uint64_t at = 0; at < j->spans[i].len; at += j->chunk) {
            size_t left = (size_t)(j->spans[i].len - at);
            j->pieces[j->npieces++] = (piece_t){(uint32_t)i, at, left < j->chunk ? left : j->chunk};
        }
    j->nunits = j->npieces;
    return 0;
}

typedef struct {
    uint64_t off;
    uint32_t span;
} by_offset_t;

static int by_offset(const void *a, const void *b)
{
    uint64_t x = ((const by_offset_t *)a)->off, y = ((const by_offset_t *)b)->off;
    return x < y ? -1 : x > y;
}

static int order_spans(job_t *j)
{
    if (!(j->order = malloc((j->nspans ? j->nspans : 1) * sizeof *j->order)))
        return ENOMEM;
    bool sorted = true;
    j->lo = UINT64_MAX;
    j->hi = 0;
    for (size_t i = 0; i < j->nspans; i++) {
        j->order[i] = (uint32_t)i;
        sorted = sorted && (i == 0 || j->spans[i].off >= j->spans[i - 1].off);
        if (j->spans[i].len == 0)
            continue;
        if (j->spans[i].off < j->lo)
            j->lo = j->spans[i].off;
        if (j->spans[i].off + j->spans[i].len > j->hi)
            j->hi = j->spans[i].off + j->spans[i].len;
    }
    if (!sorted) { /* safetensors writers keep file order; others may not */
        by_offset_t *keys = malloc(j->nspans * sizeof *keys);
        if (!keys)
            return ENOMEM;
        for (size_t i = 0; i < j->nspans; i++)
            keys[i] = (by_offset_t){j->spans[i].off, (uint32_t)i};
        qsort(keys, j->nspans, sizeof *keys, by_offset);
        for (size_t i = 0; i < j->nspans; i++)
            j->order[i] = keys[i].span;
        free(keys);
    }
    if (j->hi == 0)
        return 0;
    j->lo &= ~(DIRECT_ALIGN - 1);
    j->nunits = (size_t)((j->hi - j->lo + j->chunk - 1) / j->chunk);
    return 0;
}

/* Direct reads wait on the device, not a core: more of them in flight
 * (a deeper queue) is what pays, 4 x 16 MiB measured best here. */
#define DIRECT_READERS 4
#define DIRECT_CHUNK ((size_t)16 << 20)

static int reader_count(const _ta_load_opts_t *o, bool direct, size_t units)
{
    int n = o->threads > 0 ? o->threads : _ta_os_cpu_count();
    if (direct && o->threads <= 0 && n < DIRECT_READERS)
        n = DIRECT_READERS;
    if (n > TA_LOAD_MAX_THREADS)
        n = TA_LOAD_MAX_THREADS;
    if ((size_t)n > units)
        n = units ? (int)units : 1;
    return n;
}

void _ta_loader_open(const char *path, int fd, const _ta_load_opts_t *o, _ta_loader_t *ld)
{
    *ld = (_ta_loader_t){.fd = fd, .direct_fd = -1, .opts = *o};
    if (o->page_cache == TA_PAGE_CACHE_BYPASS && _ta_os_open_read(path, 1, &ld->direct_fd) == 0)
        ld->direct = true;
    else
        _ta_os_fadvise(fd, 0, 0, TA_OS_FADV_SEQUENTIAL); /* a larger readahead window */
}

void _ta_loader_close(_ta_loader_t *ld)
{
    if (ld->opts.page_cache != TA_PAGE_CACHE_KEEP && !ld->direct)
        _ta_os_fadvise(ld->fd, 0, 0, TA_OS_FADV_DONTNEED);
    if (ld->direct_fd >= 0)
        _ta_os_close(ld->direct_fd);
    ld->direct_fd = -1;
}

/* Runs fn(job) on `readers` threads, this one among them, and returns how
 * many ran. A thread that cannot be started is not an error: fewer work. */
static int run_readers(void *(*fn)(void *), void *job, int readers)
{
    unsigned long ids[TA_LOAD_MAX_THREADS];
    int started = 0;
    while (started < readers - 1 && _ta_os_thread_start(fn, job, &ids[started]) == 0)
        started++;
    fn(job);
    for (int i = 0; i < started; i++)
        _ta_os_thread_join(ids[i]);
    return started + 1;
}

int _ta_loader_read(_ta_loader_t *ld, const _ta_span_t *spans, size_t n, _ta_load_report_t *report,
                    char *why, size_t whylen)
{
    const _ta_load_opts_t *o = &ld->opts;
    if (o->chunk > TA_LOAD_CHUNK_MAX) { /* rounded up to DIRECT_ALIGN it would wrap to 0 */
        snprintf(why, whylen, "a read chunk of %zu bytes is over the limit of %zu", o->chunk,
                 TA_LOAD_CHUNK_MAX);
        return EINVAL;
    }
    job_t j = {.fd = ld->direct ? ld->direct_fd : ld->fd,
               .spans = spans,
               .nspans = n,
               .direct = ld->direct,
               .why = why,
               .whylen = whylen};
    size_t chunk = o->chunk ? o->chunk : j.direct ? DIRECT_CHUNK : TA_LOAD_CHUNK;
    j.chunk = (chunk + DIRECT_ALIGN - 1) & ~(size_t)(DIRECT_ALIGN - 1);
    int rc = j.direct ? order_spans(&j) : cut_pieces(&j);
    if (rc) {
        snprintf(why, whylen, "no memory to plan the reads");
    } else {
        report->threads = run_readers(reader, &j, reader_count(o, j.direct, j.nunits));
        rc = atomic_load(&j.rc);
    }
    report->direct = j.direct;
    report->reads += atomic_load(&j.reads);
    free(j.pieces);
    free(j.order);
    return rc;
}

int _ta_load_spans(const char *path, int fd, const _ta_span_t *spans, size_t n,
                   const _ta_load_opts_t *o, _ta_load_report_t *report, char *why, size_t whylen)
{
    _ta_loader_t ld;
    _ta_loader_open(path, fd, o, &ld);
    int rc = _ta_loader_read(&ld, spans, n, report, why, whylen);
    _ta_loader_close(&ld);
    return rc;
}

typedef struct {
    char *addr;
    size_t len, chunk, nunits;
    _Atomic size_t next;
    _Atomic int rc;
} populate_job_t;

static int populate_chunk(char *p, size_t len)
{
    int rc = _ta_os_populate_read(p, len);
    if (rc == EINVAL) { /* before Linux 5.14: touch every page */
        size_t page = _ta_os_page_size();
        for (size_t at = 0; at < len; at += page)
            (void)*(volatile char *)(p + at);
        rc = 0;
    }
    return rc;
}

static void *populater(void *arg)
{
    populate_job_t *j = arg;
    for (;;) {
        size_t u = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (u >= j->nunits || atomic_load_explicit(&j->rc, memory_order_relaxed))
            break;
        size_t at = u * j->chunk, len = j->len - at < j->chunk ? j->len - at : j->chunk;
        int rc = populate_chunk(j->addr + at, len), none = 0;
        if (rc)
            atomic_compare_exchange_strong(&j->rc, &none, rc);
    }
    return NULL;
}

int _ta_loader_populate(void *addr, size_t len, const _ta_load_opts_t *o, _ta_load_report_t *report,
                        char *why, size_t whylen)
{
    size_t chunk = o->chunk ? o->chunk : TA_LOAD_CHUNK, page = _ta_os_page_size();
    populate_job_t j = {.addr = addr, .len = len, .chunk = (chunk + page - 1) / page * page};
    j.nunits = (len + j.chunk - 1) / j.chunk;
    report->threads = run_readers(populater, &j, reader_count(o, false, j.nunits));
    report->direct = false;
    int rc = atomic_load(&j.rc);
    if (rc == EFAULT) {
        snprintf(why, whylen,
                 "part of the file cannot be read: it ends before the tensors it "
                 "declares do (it shrank), or a read failed");
        return TA_EFORMAT;
    }
    if (rc)
        snprintf(why, whylen, "mapping the file in failed: %s", strerror(rc));
    return rc;
}
