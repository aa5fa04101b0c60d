/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc CUDA staging: host buffers for GPU transfers are tensoralloc
 * mappings pinned with cudaHostRegister, and any large tensor (which owns
 * its mapping) can be pinned in place. libcudart is loaded at run time
 * (dlopen), never linked: without a driver or a GPU every call here returns
 * an error code (ta_strerror says which) and the rest of the library is
 * unaffected. All calls are thread-safe.
 *
 * Return values: 0 on success, else a positive errno (EINVAL, ENOMEM) or
 * one of the TA_E* codes of tensoralloc.h; ta_strerror names them.
 */
#ifndef TENSORALLOC_CUDA_H
#define TENSORALLOC_CUDA_H

#include "tensoralloc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The CUDA module's error codes (ta_strerror gives the messages). */
#define TA_CUDA_ERRORS(X)                                                                          \
    X(TA_ENORUNTIME, 1000, "CUDA runtime (libcudart) not found or incomplete")                     \
    X(TA_ENODEVICE, 1001, "no CUDA device or driver")                                              \
    X(TA_ECUDA, 1002, "a CUDA runtime call failed (see ta_cuda_last_error)")                       \
    X(TA_EPINNED, 1003, "block already pinned")                                                    \
    X(TA_ENOTPINNED, 1004, "block not pinned")
enum { TA_CUDA_ERRORS(TA_ERROR_ENUM_) };

/* Loads the runtime and selects device (ordinal); idempotent per device.
 * Called implicitly by the other calls with device 0. */
TA_API int ta_cuda_init(int device);
/* The last CUDA error of this thread: its runtime code and text. */
TA_API int ta_cuda_last_error(const char **message);

/* ---- pinned buffer pool ------------------------------------------------- */
typedef struct ta_pinned_pool ta_pinned_pool_t;

/* budget: bytes that may be registered at once by the pool's buffers. */
TA_API int ta_pinned_pool_create(size_t budget, ta_pinned_pool_t **out);
/* Unregisters and frees every buffer; buffers still acquired are freed too. */
TA_API void ta_pinned_pool_destroy(ta_pinned_pool_t *pool);
/* A page-aligned pinned buffer of at least size bytes, registered once and
 * reused. Waits while other threads hold the budget; TA_EBUDGET if size
 * exceeds the whole budget. */
TA_API int ta_pinned_acquire(ta_pinned_pool_t *pool, size_t size, void **buf);
TA_API int ta_pinned_release(ta_pinned_pool_t *pool, void *buf);

/* ---- pin in place ----------------------------------------------------------- */
/* Registers the mapping of the large block that starts at ptr (a block of
 * at least the threshold, from ta_malloc & co or the preloaded malloc).
 * ta_free of a pinned block unregisters it first. */
TA_API int ta_cuda_pin(void *ptr);
TA_API int ta_cuda_unpin(void *ptr);

/* ---- device memory and copies ----------------------------------------------- */
TA_API int ta_cuda_device_alloc(size_t size, void **dev_ptr);
TA_API int ta_cuda_device_free(void *dev_ptr);
TA_API int ta_cuda_mem_info(size_t *free_bytes, size_t *total_bytes);

/* Copies of any size. A host range inside a pinned-in-place block goes
 * straight to the DMA engine; any other goes through two staging buffers
 * from pool (double-buffered: the CPU fills one while the other is in
 * flight). pool may be NULL for pinned-in-place sources only. */
TA_API int ta_cuda_copy_to_device(ta_pinned_pool_t *pool, void *dev_dst, const void *host_src,
                                  size_t size);
TA_API int ta_cuda_copy_to_host(ta_pinned_pool_t *pool, void *host_dst, const void *dev_src,
                                size_t size);

/* Registrations are made in chunks of at most this many bytes (default
 * 64 GiB: single registrations of 512 GiB and more fail); a failed chunk
 * rolls back the ones before it. Returns EINVAL unless page-aligned > 0. */
TA_API int ta_cuda_set_register_chunk(size_t bytes);
/* Staging buffer size for copies through a pool (default 64 MiB). */
TA_API int ta_cuda_set_staging_size(size_t bytes);

#define TA_CUDA_STATS_VERSION 1
typedef struct {
    size_t size; /* set by the caller */
    uint32_t version;
    uint32_t reserved;
    uint64_t registered_bytes; /* now */
    uint64_t registered_peak;
    uint64_t registrations; /* cudaHostRegister calls that succeeded */
    uint64_t unregistrations;
    double register_seconds; /* total time in cudaHostRegister */
    uint64_t h2d_bytes, d2h_bytes;
    double h2d_seconds, d2h_seconds; /* wall time of the copy calls */
    uint64_t staged_copies, direct_copies;
} ta_cuda_stats_t;

TA_API int ta_cuda_stats_get(ta_cuda_stats_t *stats);

#ifdef __cplusplus
}
#endif
#endif
