/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc public API: an arena-free allocator for processes that load,
 * move and drop large tensors. Large requests get a mapping of their own
 * (released to the kernel on free, or kept briefly in a bounded pool for
 * the next large request); small requests go to size-class slabs. Failures return
 * NULL (or an error code) and set errno, as the C library does.
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
 *   hblks    live large mappings (pool entries not counted)
 *   hblkhd   bytes of live large mappings
 *   usmblks  peak bytes mapped for user data (both paths)
 *   fsmblks  0
 *   uordblks small-path bytes in use (block sizes)
 *   fordblks small-path bytes committed but free
 *   keepcost bytes held in the retain pool
 */
TA_API struct mallinfo2 ta_mallinfo2(void);

#define TA_STATS_VERSION 3

typedef struct ta_stats_s {
    size_t size;      /* set to sizeof(ta_stats_t) by the caller */
    uint32_t version; /* filled with TA_STATS_VERSION */
    uint32_t reserved;
    /* large path */
    uint64_t large_live_bytes; /* requested bytes of live large blocks */
    uint64_t large_peak_bytes;
    uint64_t large_live_count;   /* live large blocks (pieces may share a mapping) */
    uint64_t large_mapped_bytes; /* bytes of live mappings, pool excluded */
    uint64_t large_alloc_count;  /* large allocations served so far */
    uint64_t pool_bytes;         /* bytes retained for reuse */
    uint64_t pool_entries;
    uint64_t pool_hits;        /* large allocations served from the pool */
    uint64_t pool_misses;      /* large allocations that needed a fresh mapping */
    uint64_t pool_expired;     /* pool entries unmapped after RETAIN_MS */
    uint64_t maxmap_fallbacks; /* large blocks cut from packs near the map limit */
    uint64_t map_limit;        /* the vm.max_map_count in force */
    /* small path */
    uint64_t small_live_bytes; /* block bytes in use (batched, see docs) */
    uint64_t small_peak_bytes;
    uint64_t small_committed_bytes; /* slab pages handed to spans */
    uint64_t small_dirty_bytes;     /* free pages not yet returned */
    uint64_t small_segment_bytes;   /* segments mapped */
    uint64_t small_spans;
    uint64_t heaps; /* per-thread heaps, live and abandoned */
    /* kernel calls made by the OS layer */
    uint64_t os_map_calls;
    uint64_t os_unmap_calls;
    uint64_t os_remap_calls;
    uint64_t os_madvise_calls;
    uint64_t os_map_failures;
    /* options in force */
    uint64_t opt_threshold;
    uint64_t opt_retain_bytes;
    uint64_t opt_retain_ms;
    uint64_t opt_thp;
    uint64_t opt_verbose;
    /* version 2 */
    uint64_t mappings;           /* mappings tensoralloc holds (all kinds) */
    uint64_t os_unmap_failures;  /* failed munmaps (the range is parked, retried) */
    uint64_t os_advise_failures; /* failed madvise calls (absorbed) */
    /* version 3 */
    uint64_t parked_count; /* ranges whose munmap failed, memory given back, retried */
    uint64_t parked_bytes;
    uint64_t small_remote_released_bytes; /* pages of blocks freed into idle heaps, returned */
} ta_stats_t;

/* Fills *stats; stats->size must be set. Returns 0 or EINVAL. */
TA_API int ta_stats_get(ta_stats_t *stats);

typedef enum { TA_STATS_TEXT = 0, TA_STATS_JSON = 1 } ta_stats_format_t;
/* Writes the statistics; returns 0 or an errno. */
TA_API int ta_stats_print(FILE *out, ta_stats_format_t format);

/* ---- options ---------------------------------------------------------- */

/* Each option is also read once from TENSORALLOC_<NAME> in the environment.
 * Sizes accept K, M, G, T (powers of 1024, optional "iB"/"B"). */
typedef enum {
    TA_OPT_THRESHOLD = 0, /* bytes: the large path starts here */
    TA_OPT_RETAIN_BYTES,  /* bytes: pool bound; 0 = munmap on every free */
    TA_OPT_RETAIN_MS,     /* ms: a pooled mapping older than this is unmapped */
    TA_OPT_THP,           /* 0 off, 1 on, 2 auto (default): MADV_HUGEPAGE on large
                             mappings >= 2 MiB; auto advises fresh mappings only
                             while recently freed memory is being recycled */
    TA_OPT_STATS,         /* 0/1: print statistics to stderr at exit */
    TA_OPT_VERBOSE,       /* 0/1: warnings and decisions on stderr */
    TA_OPT_MAX_MAP_COUNT, /* count: override vm.max_map_count (tests) */
    TA_OPT_COUNT_
} ta_option_t;

TA_API long long ta_option_get(ta_option_t option);
/* Returns 0, or EINVAL for an unknown option or a value out of range. */
TA_API int ta_option_set(ta_option_t option, long long value);
TA_API const char *ta_option_name(ta_option_t option);

/* ---- error codes ---------------------------------------------------------
 * Calls that return an int give 0, a positive errno value, or one of these. */
enum {
    TA_ENORUNTIME = 1000, /* no loadable libcudart (or an entry point missing) */
    TA_ENODEVICE,         /* runtime loaded, but no usable device or driver */
    TA_ECUDA,             /* a CUDA call failed: see ta_cuda_last_error() */
    TA_EPINNED,           /* the block is already pinned */
    TA_ENOTPINNED,        /* the block is not pinned */
    TA_ENOTLARGE,         /* not the start of a live large block */
    TA_EBUDGET,           /* the request can never fit the budget */
    TA_ENOTSUP,           /* this build lacks the feature */
    TA_EFORMAT,           /* a malformed file: see ta_cache_last_error() */
    TA_ECACHEFULL,        /* no room: everything left is locked */
};

/* A message for any code this library returns (errno values included). */
TA_API const char *ta_strerror(int err);

/* ---- version ---------------------------------------------------------- */

TA_API const char *ta_version(void);
TA_API int ta_version_number(void); /* TA_VERSION_NUMBER of the library */

#ifdef __cplusplus
}
#endif
#endif
