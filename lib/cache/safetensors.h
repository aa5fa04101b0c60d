/* SPDX-License-Identifier: MIT */
/*
 * The safetensors header reader used by the model cache: reads the 8-byte
 * length and the JSON header of an open file and checks everything
 * (dtypes, shapes, offsets inside the file, no overlaps) before anyone
 * allocates. Format: https://github.com/huggingface/safetensors
 */
#ifndef TA_SAFETENSORS_H
#define TA_SAFETENSORS_H

#include "tensoralloc_cache.h"

#include <stdint.h>

typedef struct {
    char *name;
    ta_dtype_t dtype;
    int ndim;
    int64_t shape[TA_MAX_DIMS];
    uint64_t begin, end; /* within the data section */
} _ta_st_tensor_t;

typedef struct {
    _ta_st_tensor_t *tensors;
    size_t count;
    uint64_t data_start; /* file offset of the data section */
    uint64_t data_len;
} _ta_st_header_t;

#define TA_ST_MAX_HEADER ((uint64_t)100 << 20)

/* Returns 0, TA_EFORMAT with a message in err, or an errno. */
int _ta_st_read_header(int fd, _ta_st_header_t *out, char *err, size_t errlen);
void _ta_st_free(_ta_st_header_t *h);
/* dtype by safetensors name; -1 if unknown. */
int _ta_st_dtype_from_name(const char *name);

#endif
