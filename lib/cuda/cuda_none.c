/* SPDX-License-Identifier: MIT */
/*
 * The CUDA staging API in a build configured with -Dcuda=disabled: every
 * call reports TA_ENOTSUP, so programs link and run the same either way.
 */
#include "core/core.h"
#include "staging.h"
#include "tensoralloc_cuda.h"

#include <errno.h>
#include <string.h>

bool _ta_cuda_ready(void)
{
    return false;
}

int ta_cuda_init(int device)
{
    (void)device;
    return TA_ENOTSUP;
}
int ta_cuda_last_error(const char **message)
{
    if (message)
        *message = "built without CUDA staging";
    return 0;
}
int ta_pinned_pool_create(size_t budget, ta_pinned_pool_t **out)
{
    (void)budget;
    (void)out;
    return TA_ENOTSUP;
}
void ta_pinned_pool_destroy(ta_pinned_pool_t *pool)
{
    (void)pool;
}
int ta_pinned_acquire(ta_pinned_pool_t *pool, size_t size, void **buf)
{
    (void)pool, (void)size, (void)buf;
    return TA_ENOTSUP;
}
int ta_pinned_release(ta_pinned_pool_t *pool, void *buf)
{
    (void)pool, (void)buf;
    return TA_ENOTSUP;
}
int ta_cuda_pin(void *ptr)
{
    (void)ptr;
    return TA_ENOTSUP;
}
int ta_cuda_unpin(void *ptr)
{
    (void)ptr;
    return TA_ENOTSUP;
}
int ta_cuda_device_alloc(size_t size, void **dev_ptr)
{
    (void)size, (void)dev_ptr;
    return TA_ENOTSUP;
}
int ta_cuda_device_free(void *dev_ptr)
{
    (void)dev_ptr;
    return TA_ENOTSUP;
}
int ta_cuda_mem_info(size_t *free_bytes, size_t *total_bytes)
{
    (void)free_bytes, (void)total_bytes;
    return TA_ENOTSUP;
}
int ta_cuda_copy_to_device(ta_pinned_pool_t *pool, void *dev_dst, const void *host_src, size_t size)
{
    (void)pool, (void)dev_dst, (void)host_src, (void)size;
    return TA_ENOTSUP;
}
int ta_cuda_copy_to_host(ta_pinned_pool_t *pool, void *host_dst, const void *dev_src, size_t size)
{
    (void)pool, (void)host_dst, (void)dev_src, (void)size;
    return TA_ENOTSUP;
}
int ta_cuda_set_register_chunk(size_t bytes)
{
    (void)bytes;
    return TA_ENOTSUP;
}
int ta_cuda_set_staging_size(size_t bytes)
{
    (void)bytes;
    return TA_ENOTSUP;
}
int ta_cuda_stats_get(ta_cuda_stats_t *stats)
{
    if (stats == NULL || stats->size < sizeof(size_t))
        return EINVAL;
    size_t size = stats->size;
    memset(stats, 0, size < sizeof *stats ? size : sizeof *stats);
    stats->size = size;
    return TA_ENOTSUP;
}

int _ta_cuda_upload(ta_pinned_pool_t *pool, const _ta_upload_t *spans, size_t n, size_t chunk,
                    _ta_upload_read_fn read, void *arg)
{
    (void)pool, (void)spans, (void)n, (void)chunk, (void)read, (void)arg;
    return TA_ENORUNTIME;
}
