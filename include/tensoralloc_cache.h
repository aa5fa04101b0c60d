/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc model cache: named entries of tensors under a RAM budget and
 * a VRAM budget, least-recently-used eviction of unlocked entries, loading
 * from raw and safetensors files straight into per-tensor mappings, moves
 * to and from the GPU through the CUDA staging module, and statistics with
 * memory snapshots. Thread-safe. In libtensoralloc only (not the preload
 * library). See docs/cache.md.
 *
 * Calls return 0, a positive errno (EINVAL, ENOMEM, ENOENT, EEXIST, EBUSY,
 * or the errno of a failed read) or a TA_E* code (tensoralloc.h's
 * convention); ta_cache_last_error gives the message of the last failure.
 */
#ifndef TENSORALLOC_CACHE_H
#define TENSORALLOC_CACHE_H

#include "tensoralloc.h"
#include "tensoralloc_cuda.h" /* its codes: device calls return them */

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The cache's error codes (ta_strerror gives the messages). */
#define TA_CACHE_ERRORS(X)                                                                         \
    X(TA_EFORMAT, 1008, "malformed file (see ta_cache_last_error)")                                \
    X(TA_ECACHEFULL, 1009, "no room in the cache: the rest is locked")
enum { TA_CACHE_ERRORS(TA_ERROR_ENUM_) };

typedef enum {
    TA_DTYPE_BOOL,
    TA_DTYPE_U8,
    TA_DTYPE_I8,
    TA_DTYPE_U16,
    TA_DTYPE_I16,
    TA_DTYPE_F16,
    TA_DTYPE_BF16,
    TA_DTYPE_U32,
    TA_DTYPE_I32,
    TA_DTYPE_F32,
    TA_DTYPE_U64,
    TA_DTYPE_I64,
    TA_DTYPE_F64,
    TA_DTYPE_F8_E4M3,
    TA_DTYPE_F8_E5M2,
    TA_DTYPE_COUNT_
} ta_dtype_t;

/* Bytes per element (0 for an unknown dtype) and the safetensors name. */
TA_API size_t ta_dtype_size(ta_dtype_t dtype);
TA_API const char *ta_dtype_name(ta_dtype_t dtype);

#define TA_MAX_DIMS 8

typedef struct {
    const char *name;
    ta_dtype_t dtype;
    int ndim;
    int64_t shape[TA_MAX_DIMS];
    size_t nbytes;
    void *data;        /* host copy, NULL when the entry holds none */
    void *device_data; /* device copy, NULL when not on the device */
} ta_tensor_t;

typedef enum { TA_LOG_ERROR, TA_LOG_WARN, TA_LOG_INFO, TA_LOG_DEBUG } ta_log_level_t;
typedef void (*ta_log_fn)(void *arg, ta_log_level_t level, const char *message);

/* What a load or tensor allocation does when the budget cannot be met
 * because the rest of the cache is locked. */
typedef enum {
    TA_OVERFLOW_REFUSE = 0, /* fail with TA_ECACHEFULL; the cache is unchanged */
    TA_OVERFLOW_ADMIT = 1,  /* admit over budget, log a warning, count it */
} ta_overflow_t;

/* What a load does with the page cache. */
typedef enum {
    TA_PAGE_CACHE_KEEP = 0,   /* buffered reads; the file stays cached (fastest to load again) */
    TA_PAGE_CACHE_DROP = 1,   /* buffered reads, then POSIX_FADV_DONTNEED of the file */
    TA_PAGE_CACHE_BYPASS = 2, /* O_DIRECT reads; where refused (tmpfs), as DROP */
    /* safetensors loads map the file privately: tensors share the page cache's
     * pages (no second copy, no reads) until written; the file is leased and
     * an entry whose file is about to change is copied into memory first
     * (docs/cache.md "Mapped entries"); where it cannot be leased, as KEEP */
    TA_PAGE_CACHE_MAP = 3,
    TA_PAGE_CACHE_COUNT_ /* how many modes there are; not a mode */
} ta_page_cache_t;

typedef enum {
    /* evict unlocked entries, least recently used first, when the kernel
     * signals memory pressure, and hold the budget lower until it passes */
    TA_CACHE_PRESSURE_GIVE_WAY = 0,
    TA_CACHE_PRESSURE_IGNORE = 1, /* the budget alone decides */
} ta_cache_pressure_t;

/* What a pressure event did, for config.on_pressure (called on the
 * allocator's purge thread, after the eviction; it may destroy a cache,
 * its own too). */
typedef struct {
    uint32_t sources;         /* TA_PRESSURE_* bits (tensoralloc.h) that fired */
    const char *figure;       /* the kernel's figures, one line */
    uint64_t released_bytes;  /* the allocator gave back first (pool, free pages) */
    uint64_t evicted_bytes;   /* this cache then evicted */
    uint64_t evicted_entries;
    uint64_t ram_used;        /* after */
    uint64_t budget;          /* the RAM budget in force now (lowered) */
} ta_cache_pressure_event_t;

#define TA_CACHE_MAX_PRESSURE_CALM_MS ((uint64_t)24 * 3600 * 1000)

/* The largest load_chunk and keep_alive_ms ta_cache_create accepts. */
#define TA_CACHE_MAX_LOAD_CHUNK ((size_t)1 << 30)                     /* 1 GiB */
#define TA_CACHE_MAX_KEEP_ALIVE_MS ((uint64_t)365 * 24 * 3600 * 1000) /* a year */

/* ta_cache_create checks every field and refuses a bad one with EINVAL, the
 * field named in ta_cache_last_error; nothing is created then. */
typedef struct {
    size_t size;               /* sizeof(ta_cache_config_t); less from older callers */
    size_t ram_budget;         /* bytes of host tensor memory; 0: ta_cache_budget_rule's */
    size_t vram_budget;        /* bytes of device tensor memory; 0: no device use */
    int device;                /* CUDA device ordinal, 0 or more */
    size_t device_working_mem; /* device bytes to leave free for computation */
    bool keep_ram_copy;        /* keep host copies of entries on the device */
    ta_overflow_t overflow;
    ta_log_fn log; /* NULL: no logging */
    void *log_arg;
    ta_log_level_t log_level; /* messages up to this level are passed on */
    /* Loads (fields a caller's smaller config.size leaves out are 0). */
    int load_threads;  /* reader threads per load, 0 or more; 0: one per core; at most 8 run */
    size_t load_chunk; /* bytes per read (rounded up to 4 KiB), at most TA_CACHE_MAX_LOAD_CHUNK;
                          0: 4 MiB */
    ta_page_cache_t page_cache; /* 0: TA_PAGE_CACHE_KEEP */
    uint64_t keep_alive_ms;     /* evict unlocked entries unused this long (a timer), at most
                                   TA_CACHE_MAX_KEEP_ALIVE_MS; 0: never */
    /* Memory pressure (docs/cache.md "Memory pressure"). */
    ta_cache_pressure_t pressure; /* 0: TA_CACHE_PRESSURE_GIVE_WAY */
    size_t pressure_floor;        /* pressure evicts down to this many RAM bytes, not below */
    uint64_t pressure_calm_ms;    /* after this long without pressure the budget grows back by
                                     an eighth, each time; 0: 10 s; at most a day */
    void (*on_pressure)(const ta_cache_pressure_event_t *event, void *arg); /* NULL: none */
    void *on_pressure_arg;
} ta_cache_config_t;

typedef struct ta_cache ta_cache_t;
typedef struct ta_entry ta_entry_t;

TA_API int ta_cache_create(const ta_cache_config_t *config, ta_cache_t **out);
/* The RAM budget a config with ram_budget 0 gets, after InvokeAI's rule
 * (docs/cache.md): half of memory less 2 GiB, at most 32 GiB without a
 * device (vram_budget 0) or vram_budget - device_working_mem with one, at
 * least 4 GiB or half of memory where that is less. memory: the smaller of
 * physical memory and the cgroup limit (0: this machine's). */
TA_API size_t ta_cache_budget_rule(size_t memory, size_t vram_budget, size_t device_working_mem);
/* Frees every entry (entries still locked included: do not use them). */
TA_API void ta_cache_destroy(ta_cache_t *cache);

/* A hit returns the entry locked (ta_entry_unlock when done) and counts a
 * hit; ENOENT counts a miss. A get of an entry another thread is loading,
 * or building (ta_cache_create_entry, until its creator unlocks it), waits
 * for it to be complete; the building thread's own get fails with EDEADLK
 * instead of waiting for itself. */
TA_API int ta_cache_get(ta_cache_t *cache, const char *key, ta_entry_t **out);
TA_API void ta_entry_unlock(ta_entry_t *entry);
/* Evicts an unlocked entry now (EBUSY if locked, ENOENT if absent). */
TA_API int ta_cache_remove(ta_cache_t *cache, const char *key);
/* Whether key is in the cache (loading included); counts no hit or miss. */
TA_API bool ta_cache_contains(ta_cache_t *cache, const char *key);
/* A copy of the keys, least recently used first: *keys is an array of
 * *count strings, freed with ta_cache_keys_free. */
TA_API int ta_cache_keys(ta_cache_t *cache, char ***keys, size_t *count);
TA_API void ta_cache_keys_free(char **keys);

/* Loads a safetensors file into a new entry (EEXIST if key exists). The
 * header is read and checked whole before anything is evicted or
 * allocated: a bad file (TA_EFORMAT, message in ta_cache_last_error)
 * leaves the cache exactly as it was. Returns the entry locked. */
TA_API int ta_cache_load_safetensors(ta_cache_t *cache, const char *key, const char *path,
                                     ta_entry_t **out);
/* Loads a safetensors file into a new entry on the device, under the VRAM
 * budget as ta_entry_to_device. With keep_ram_copy, as
 * ta_cache_load_safetensors then ta_entry_to_device; without, the file
 * streams through two pinned staging buffers to the device (one read into
 * while the other's DMA runs) and no host copy of the entry is ever made.
 * TA_ENODEVICE or TA_ENORUNTIME without a GPU. Returns the entry locked. */
TA_API int ta_cache_load_safetensors_to_device(ta_cache_t *cache, const char *key, const char *path,
                                               ta_entry_t **out);
/* Loads a raw file as one tensor named "data"; its size must match the
 * dtype and shape. */
TA_API int ta_cache_load_raw(ta_cache_t *cache, const char *key, const char *path, ta_dtype_t dtype,
                             int ndim, const int64_t *shape, ta_entry_t **out);
/* Creates an empty entry, locked, to fill with ta_entry_add_tensor. It is
 * under construction until its creator unlocks it: gets wait for that (the
 * key exists: contains is true, a second create or load gets EEXIST), so
 * nobody sees it half built. */
TA_API int ta_cache_create_entry(ta_cache_t *cache, const char *key, ta_entry_t **out);
/* Allocates a tensor in an entry under construction, charged to the RAM
 * budget (making room first); *data receives its memory (uninitialised).
 * EINVAL once the entry is complete (unlocked by its creator, or loaded):
 * holders read its tensors without a lock, so they never change. */
TA_API int ta_entry_add_tensor(ta_entry_t *entry, const char *name, ta_dtype_t dtype, int ndim,
                               const int64_t *shape, void **data);

/* Readers of a locked entry (any number of threads at once). */
TA_API const char *ta_entry_key(const ta_entry_t *entry);
TA_API size_t ta_entry_tensor_count(const ta_entry_t *entry);
/* By index or by name; fills *out (valid while the entry is locked). */
TA_API int ta_entry_tensor_at(const ta_entry_t *entry, size_t index, ta_tensor_t *out);
TA_API int ta_entry_tensor(const ta_entry_t *entry, const char *name, ta_tensor_t *out);
TA_API size_t ta_entry_ram_bytes(const ta_entry_t *entry);
TA_API size_t ta_entry_vram_bytes(const ta_entry_t *entry);

/* Device moves of a locked entry through the staging module. to_device
 * makes room in VRAM by evicting the device copies of unlocked entries,
 * least recently used first (an entry without a host copy is evicted
 * whole), and frees the host copy unless keep_ram_copy. to_host makes the
 * host copy again (charged to the RAM budget) and frees the device copy.
 * Without a GPU these return TA_ENODEVICE or TA_ENORUNTIME. */
TA_API int ta_entry_to_device(ta_entry_t *entry);
TA_API int ta_entry_to_host(ta_entry_t *entry);

/* The code of this thread's last failed cache call (0 if none failed) and,
 * in *message when not NULL, its text: as ta_cuda_last_error. */
TA_API int ta_cache_last_error(const char **message);

/* ---- statistics and memory snapshots ------------------------------------ */

typedef struct {
    size_t size; /* sizeof(ta_cache_stats_t), set by the caller */
    uint32_t version;
    uint32_t reserved;
    uint64_t hits, misses;
    uint64_t high_watermark; /* most RAM bytes the cache held */
    uint64_t in_cache;       /* entries now */
    uint64_t cleared;        /* entries evicted to make room, in total */
    uint64_t ram_budget, ram_used;
    uint64_t vram_budget, vram_used;
    uint64_t over_budget_admits;
    uint64_t loads, load_bytes;
    double load_seconds; /* file reads: load_bytes / load_seconds = B/s */
    uint64_t device_moves;
    /* version 2: the last load */
    uint64_t last_load_bytes;
    double last_load_seconds;
    uint32_t last_load_readers; /* reader threads it ran */
    uint32_t last_load_direct;  /* 1: read with O_DIRECT */
    uint64_t expired;           /* entries evicted by keep_alive_ms */
    /* version 3: TA_PAGE_CACHE_MAP */
    uint64_t mapped_loads;  /* loads that mapped their file */
    uint64_t mapped_copied; /* mapped entries copied into memory: their file was to change */
    /* version 4: memory pressure */
    uint64_t pressure_events;         /* events the cache gave way to */
    uint64_t pressure_evicted_bytes;  /* bytes of entries evicted on pressure */
    uint64_t pressure_released_bytes; /* bytes the allocator gave back on those events */
    uint64_t budget_now;              /* the RAM budget in force (ram_budget, or lower under
                                         pressure) */
} ta_cache_stats_t;

#define TA_CACHE_STATS_VERSION 4
TA_API int ta_cache_stats_get(ta_cache_t *cache, ta_cache_stats_t *stats);
/* Statistics as JSON, with each entry's largest loaded size (InvokeAI's
 * loaded_model_sizes) and the last TA_CACHE_RECENT_LOADS loads, oldest
 * first ("recent_loads": key, bytes, seconds, gbps, readers, direct). */
#define TA_CACHE_RECENT_LOADS 16
TA_API int ta_cache_stats_json(ta_cache_t *cache, FILE *out);

/* Memory snapshots (ta_memory_snapshot, ta_memory_snapshot_diff) are
 * process-wide: declared in tensoralloc.h. */

#ifdef __cplusplus
}
#endif
#endif
