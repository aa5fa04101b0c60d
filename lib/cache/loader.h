/* SPDX-License-Identifier: MIT */
/*
 * The model cache's loader: reads byte ranges of a file into memory with
 * several threads, in chunks; buffered (straight into the destination) or O_DIRECT (through
 * aligned per-thread buffers). Calls only the OS layer.
 */
#ifndef TA_LOADER_H
#define TA_LOADER_H

#include "tensoralloc_cache.h"

#include <stdbool.h>
#include <stdint.h>

/* len bytes at file offset off go to dst. */
typedef struct {
    void *dst;
    uint64_t off;
    size_t len;
} _ta_span_t;

typedef struct {
    int threads;  /* 0: one per core, at most TA_LOAD_MAX_THREADS */
    size_t chunk; /* bytes per read, rounded up to 4 KiB; 0: TA_LOAD_CHUNK */
    ta_page_cache_t page_cache;
} _ta_load_opts_t;

typedef struct {
    int threads;    /* readers that ran, the caller included */
    bool direct;    /* O_DIRECT was used */
    uint64_t reads; /* read calls made */
    bool mapped;    /* the file was mapped, not read (set by the cache) */
} _ta_load_report_t;

#define TA_LOAD_MAX_THREADS 8
#define TA_LOAD_CHUNK ((size_t)4 << 20)
#define TA_LOAD_CHUNK_MAX TA_CACHE_MAX_LOAD_CHUNK /* larger: EINVAL */

/* A load of one file: opened once (path reopened with O_DIRECT for
 * TA_PAGE_CACHE_BYPASS, the readahead hint given), read any number of
 * times, closed once (the page cache dropped for TA_PAGE_CACHE_DROP). */
typedef struct {
    int fd, direct_fd;
    bool direct;
    _ta_load_opts_t opts;
} _ta_loader_t;

void _ta_loader_open(const char *path, int fd, const _ta_load_opts_t *opts, _ta_loader_t *ld);
/* Reads every span (non-overlapping); errors as _ta_load_spans. reads adds
 * up over calls; threads and direct are the last call's. */
int _ta_loader_read(_ta_loader_t *ld, const _ta_span_t *spans, size_t n, _ta_load_report_t *report,
                    char *why, size_t whylen);
void _ta_loader_close(_ta_loader_t *ld);

/* Faults len bytes of a private file mapping at addr (page aligned) in for
 * reading, in chunks, from the load's readers at once (MADV_POPULATE_READ;
 * on kernels without it a read of every page, which the file guard keeps
 * from faulting). TA_EFORMAT when the file ends before the range does.
 * report as _ta_loader_read's (no reads). */
int _ta_loader_populate(void *addr, size_t len, const _ta_load_opts_t *opts,
                        _ta_load_report_t *report, char *why, size_t whylen);

/* One open, read and close: reads every span from fd (opened buffered; path is reopened for
 * O_DIRECT). Returns 0, an errno of a failed read (message in why), TA_EFORMAT when the file
 * ends before a span does (it shrank), or EINVAL for a chunk over TA_LOAD_CHUNK_MAX. Spans
 * must not overlap. */
int _ta_load_spans(const char *path, int fd, const _ta_span_t *spans, size_t n,
                   const _ta_load_opts_t *opts, _ta_load_report_t *report, char *why,
                   size_t whylen);

#endif
