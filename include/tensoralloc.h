/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc public API: an arena-free allocator for processes that load,
 * move and drop large tensors. Large requests get a mapping of their own,
 * or under 2 MiB a part of a run mapped for several (each block owns its
 * pages; released to the kernel on free, or kept briefly in a bounded pool for
 * the next large request; near vm.max_map_count they are cut from shared
 * packs instead); small requests go to size-class slabs. Allocation
 * failures return NULL and set errno, as the C library does; other calls
 * follow the convention under "errors" below.
 */
#ifndef TENSORALLOC_H
#define TENSORALLOC_H

#include <malloc.h> /* struct mallinfo2 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "tensoralloc_version.h"

#if defined(TA_BUILDING_LIBRARY)
#define TA_API __attribute__((visibility("default")))
#else
#define TA_API
#endif

#define TA_ATTR_MALLOC __attribute__((malloc, warn_unused_result))
#define TA_ATTR_ALLOC_SIZE(n) __attribute__((alloc_size(n)))
#define TA_ATTR_ALLOC_SIZE2(n, m) __attribute__((alloc_size(n, m)))

/* ---- allocation: the C semantics of the libc namesakes ---------------- */

TA_API void *ta_malloc(size_t size) TA_ATTR_MALLOC TA_ATTR_ALLOC_SIZE(1);
TA_API void *ta_calloc(size_t count, size_t size) TA_ATTR_MALLOC TA_ATTR_ALLOC_SIZE2(1, 2);
/* ta_realloc(p, 0) frees p and returns NULL, as glibc does. */
TA_API void *ta_realloc(void *ptr, size_t size) __attribute__((warn_unused_result))
TA_ATTR_ALLOC_SIZE(2);
TA_API void ta_free(void *ptr);
/* Any power-of-two alignment; size need not be a multiple of it (glibc). */
TA_API void *ta_aligned_alloc(size_t alignment, size_t size) TA_ATTR_MALLOC TA_ATTR_ALLOC_SIZE(2);
/* Returns 0, EINVAL (alignment not a power of two multiple of sizeof(void*))
 * or ENOMEM; errno is left untouched, as POSIX says. */
TA_API int ta_posix_memalign(void **out, size_t alignment, size_t size);
TA_API size_t ta_usable_size(const void *ptr);

/* Releases everything retained now: the large path's pool of mappings and
 * the free slab pages of the calling thread and of exited threads. */
TA_API void ta_trim(void);

/* ---- statistics ------------------------------------------------------- */

/*
 * glibc's struct mallinfo2, filled from tensoralloc's own state:
 *   arena    bytes of slab pages committed by the small path
 *   ordblks  slab spans in use
 *   smblks   0
 *   hblks    live large blocks (pool entries not counted; blocks cut from a
 *            pack near the map limit share its mapping)
 *   hblkhd   bytes of the live large blocks' mappings
 *   usmblks  peak bytes mapped for user data (both paths)
 *   fsmblks  0
 *   uordblks small-path bytes in use (block sizes)
 *   fordblks small-path bytes committed but free
 *   keepcost bytes held in the retain pool
 */
TA_API struct mallinfo2 ta_mallinfo2(void);

#define TA_STATS_VERSION 4

/* The statistics fields, X(name, description) each, in order: the struct
 * below, the text and JSON printers and ta_stats_field are all made from
 * this one list. Every field is a uint64_t; new ones go at the end. */
/* clang-format off */
#define TA_STATS_FIELDS(X) \
    /* large path */ \
    X(large_live_bytes, "requested bytes of live large blocks") \
    X(large_peak_bytes, "most live large bytes so far") \
    X(large_live_count, "live large blocks (pieces may share a mapping)") \
    X(large_mapped_bytes, "bytes of live mappings, pool excluded") \
    X(large_alloc_count, "large allocations served so far") \
    X(pool_bytes, "bytes retained for reuse") \
    X(pool_entries, "ranges retained for reuse") \
    X(pool_hits, "large allocations served from the pool") \
    X(pool_misses, "large allocations that needed a fresh mapping") \
    X(pool_expired, "pool ranges unmapped after RETAIN_MS") \
    X(maxmap_fallbacks, "large blocks cut from packs near the map limit") \
    X(map_limit, "the vm.max_map_count in force") \
    /* small path */ \
    X(small_live_bytes, "block bytes in use (batched, see docs)") \
    X(small_peak_bytes, "most small bytes in use so far") \
    X(small_committed_bytes, "slab pages handed to spans") \
    X(small_dirty_bytes, "free pages not yet returned") \
    X(small_segment_bytes, "segments mapped") \
    X(small_spans, "spans in use") \
    X(heaps, "per-thread heaps, live and abandoned") \
    /* kernel calls made by the OS layer */ \
    X(os_map_calls, "mmap calls") \
    X(os_unmap_calls, "munmap calls") \
    X(os_remap_calls, "mremap calls") \
    X(os_madvise_calls, "madvise calls") \
    X(os_map_failures, "failed mmap calls") \
    /* options in force */ \
    X(opt_threshold, "THRESHOLD") \
    X(opt_retain_bytes, "RETAIN_BYTES") \
    X(opt_retain_ms, "RETAIN_MS") \
    X(opt_thp, "THP: 0 off, 1 on, 2 auto") \
    X(opt_verbose, "VERBOSE") \
    /* version 2 */ \
    X(mappings, "mappings tensoralloc holds (all kinds)") \
    X(os_unmap_failures, "failed munmaps (the range is parked, retried)") \
    X(os_advise_failures, "failed madvise calls (absorbed)") \
    /* version 3 */ \
    X(parked_count, "ranges whose munmap failed, memory given back, retried") \
    X(parked_bytes, "bytes of those ranges") \
    X(small_remote_released_bytes, "pages of blocks freed into idle heaps, returned") \
    /* version 4 */ \
    X(pressure_events, "memory-pressure events responded to") \
    X(pressure_released_bytes, "bytes given back by the allocator on pressure") \
    X(pressure_sources, "sources watched: 2 machine PSI, 4 cgroup v2, 8 cgroup v1")
/* clang-format on */

#define TA_STATS_FIELD_(name, description) uint64_t name;
typedef struct ta_stats_s {
    size_t size;      /* set to sizeof(ta_stats_t) by the caller */
    uint32_t version; /* filled with TA_STATS_VERSION */
    uint32_t reserved;
    TA_STATS_FIELDS(TA_STATS_FIELD_)
} ta_stats_t;
#undef TA_STATS_FIELD_

/* Field i of the list above (for bindings: no list of names of their own):
 * its name, description and value in *stats; EINVAL past the end. */
TA_API int ta_stats_field(const ta_stats_t *stats, size_t i, const char **name,
                          const char **description, uint64_t *value);

/* Fills *stats; stats->size must be set. Returns 0 or EINVAL. */
TA_API int ta_stats_get(ta_stats_t *stats);

typedef enum { TA_STATS_TEXT = 0, TA_STATS_JSON = 1 } ta_stats_format_t;
/* Writes the statistics; returns 0 or an errno. */
TA_API int ta_stats_print(FILE *out, ta_stats_format_t format);

/* ---- memory pressure ---------------------------------------------------
 * The purge thread watches the kernel's signals (docs/cache.md "Memory
 * pressure"): PSI triggers on the machine and the process's cgroup v2
 * group, the vmpressure level and a usage threshold of its cgroup v1
 * memory group. On an event it gives back what the allocator keeps (the
 * retain pool, free slab pages of every heap) at once, then calls the
 * listeners (the model cache is one). */
typedef enum {
    TA_PRESSURE_MACHINE = 2, /* /proc/pressure/memory */
    TA_PRESSURE_CGROUP2 = 4, /* the cgroup v2 group's memory.pressure */
    TA_PRESSURE_CGROUP1 = 8, /* the cgroup v1 memory group */
    TA_PRESSURE_CALLER = 16, /* ta_pressure_signal */
} ta_pressure_source_t;

typedef struct {
    uint32_t sources;        /* the TA_PRESSURE_* bits that fired */
    uint64_t events;         /* events so far, this one included */
    uint64_t released_bytes; /* given back by the allocator for this one */
    const char *figure;      /* the kernel's figures, one line (valid during the call) */
} ta_pressure_event_t;

/* Called on the purge thread (or ta_pressure_signal's caller), after the
 * allocator's own release, one call at a time; ta_pressure_listen and
 * ta_pressure_signal from it give EDEADLK. */
typedef void (*ta_pressure_fn)(const ta_pressure_event_t *event, void *arg);
/* Adds a listener: 0, EINVAL (fn NULL), EEXIST (fn, arg already listen),
 * ENOSPC (16 listen already). */
TA_API int ta_pressure_listen(ta_pressure_fn fn, void *arg);
/* Removes it, waiting for a call of it in progress (from a listener, it
 * takes effect at once: the response calls it no more): 0 or ENOENT. */
TA_API int ta_pressure_unlisten(ta_pressure_fn fn, void *arg);
/* Responds as to the kernel's signal, now, in the calling thread (a
 * program with signals of its own, and tests). 0, or EDEADLK from a
 * listener. */
TA_API int ta_pressure_signal(void);

/* ---- memory snapshots ------------------------------------------------- */
/* Process-wide figures at one moment, and InvokeAI's diff of two. */
typedef struct {
    uint64_t rss;             /* process resident set */
    uint64_t mapped;          /* mallinfo2 hblkhd: large blocks */
    uint64_t small_used;      /* uordblks */
    uint64_t small_free;      /* fordblks */
    uint64_t total_allocated; /* arena + hblkhd */
    uint64_t total_used;      /* uordblks + hblkhd */
    uint64_t vram;            /* device memory in use (0 without a device) */
} ta_memory_snapshot_t;

TA_API void ta_memory_snapshot(ta_memory_snapshot_t *out);
/* One metric per line: "name (+delta GB): before GB -> after GB". Returns
 * the length written (as snprintf). */
TA_API int ta_memory_snapshot_diff(const ta_memory_snapshot_t *before,
                                   const ta_memory_snapshot_t *after, char *buf, size_t len);

/* ---- options ---------------------------------------------------------- */

/* Each option is also read once from TENSORALLOC_<NAME> in the environment.
 * Sizes accept K, M, G, T (powers of 1024, optional "iB"/"B"). */
typedef enum {
    TA_OPT_THRESHOLD = 0, /* bytes: the large path starts here */
    TA_OPT_RETAIN_BYTES,  /* bytes: pool bound; 0 = munmap on every free */
    TA_OPT_RETAIN_MS,     /* ms: a pooled mapping older than this is unmapped */
    TA_OPT_THP,           /* 0 off, 1 on, 2 auto (default): MADV_HUGEPAGE on large
                             mappings >= 2 MiB (runs included); auto while probes
                             (unadvised mappings, read with mincore) show blocks
                             written whole */
    TA_OPT_STATS,         /* 0/1: print statistics to stderr at exit */
    TA_OPT_VERBOSE,       /* 0/1: warnings and decisions on stderr */
    TA_OPT_MAX_MAP_COUNT, /* count: override vm.max_map_count (tests) */
    TA_OPT_PURGE_THREAD,  /* 0 off, 1 on, 2 auto (default): the purge thread that
                             gives memory back while the program is idle; auto
                             starts it only in a process that already has threads
                             of its own (docs/reliability.md) */
    TA_OPT_PRESSURE,      /* 0/1 (default 1): the purge thread listens to the
                             kernel's memory-pressure signals and gives memory
                             back at once (docs/cache.md "Memory pressure") */
    TA_OPT_COUNT_
} ta_option_t;

/* *value receives the option's value in force; EINVAL for an unknown option. */
TA_API int ta_option_get(ta_option_t option, long long *value);
/* Returns 0, or EINVAL for an unknown option or a value out of range. */
TA_API int ta_option_set(ta_option_t option, long long value);
TA_API const char *ta_option_name(ta_option_t option);

/* ---- errors ----------------------------------------------------------------
 * One convention for every call that can fail: it returns an int, 0 on
 * success, else a positive errno value or one of the TA_E* codes; results
 * come back through pointer arguments. (The allocation functions keep the C
 * library's: NULL with errno set.) ta_cuda_last_error and
 * ta_cache_last_error give the code and message of a thread's last failure.
 *
 * Each module's codes are one X(name, value, message) table in its own
 * header: the core's here, TA_CUDA_ERRORS in tensoralloc_cuda.h,
 * TA_CACHE_ERRORS in tensoralloc_cache.h. ta_strerror is made from them. */
#define TA_ERRORS(X)                                                                               \
    X(TA_ENOTLARGE, 1005, "not the start of a live large block")                                   \
    X(TA_EBUDGET, 1006, "request larger than the budget (pinned pool, cache)")                     \
    X(TA_ENOTSUP, 1007, "not supported by this build")
#define TA_ERROR_ENUM_(name, value, message) name = value,
enum { TA_ERRORS(TA_ERROR_ENUM_) };

/* A message for any code this library returns (errno values included). */
TA_API const char *ta_strerror(int err);

/* ---- version ---------------------------------------------------------- */

TA_API const char *ta_version(void);
TA_API int ta_version_number(void); /* TA_VERSION_NUMBER of the library */

#ifdef __cplusplus
}
#endif
#endif
