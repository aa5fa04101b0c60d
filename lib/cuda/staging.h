/* SPDX-License-Identifier: MIT */
/*
 * The CUDA staging module's internals, for the files above it (the cache
 * and the statistics): lib/cuda/cuda.c, or lib/cuda/cuda_none.c when it is left out.
 */
#ifndef TA_STAGING_H
#define TA_STAGING_H

#include "tensoralloc_cuda.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* True once the runtime is loaded and a device selected (no loading here). */
bool _ta_cuda_ready(void);
/* Uploads: len bytes at offset off of a byte stream go to device memory dev. */
typedef struct {
    void *dev;
    uint64_t off;
    size_t len;
} _ta_upload_t;
/* Fills buf with len bytes of the stream at off: 0 or an error code. */
typedef int (*_ta_upload_read_fn)(void *arg, void *buf, uint64_t off, size_t len);
struct ta_pinned_pool;
/* Streams the spans' bytes (read by `read`, in order, chunk bytes at a time;
 * 0: the staging size) to the device through two of pool's staging buffers:
 * one is read into while the other's DMA runs. No host copy of the whole. */
int _ta_cuda_upload(struct ta_pinned_pool *pool, const _ta_upload_t *spans, size_t n, size_t chunk,
                    _ta_upload_read_fn read, void *arg);

#endif
