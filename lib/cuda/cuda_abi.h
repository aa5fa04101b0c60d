/* SPDX-License-Identifier: MIT */
/*
 * The slice of the CUDA runtime ABI the staging module uses, as function
 * pointer types. With the toolkit's headers (TA_HAVE_CUDA_HEADERS) the
 * types come from cuda_runtime_api.h; without them, from the stable values
 * below, so the module (and its tests against a test double) builds on any
 * machine. The library never links libcudart.
 */
#ifndef TA_CUDA_ABI_H
#define TA_CUDA_ABI_H

#include <stddef.h>

#ifdef TA_HAVE_CUDA_HEADERS
#include <cuda_runtime_api.h>
typedef cudaError_t ta_cuerr_t;
typedef cudaStream_t ta_custream_t;
typedef cudaEvent_t ta_cuevent_t;
#define TA_CU_H2D cudaMemcpyHostToDevice
#define TA_CU_D2H cudaMemcpyDeviceToHost
#define TA_CU_KIND enum cudaMemcpyKind
#else
typedef int ta_cuerr_t;
typedef struct CUstream_st *ta_custream_t;
typedef struct CUevent_st *ta_cuevent_t;
#define TA_CU_H2D 1
#define TA_CU_D2H 2
#define TA_CU_KIND int
#endif

#define TA_CU_SUCCESS 0
#define TA_CU_ERR_STUB 34      /* cudaErrorStubLibrary */
#define TA_CU_ERR_DRIVER 35    /* cudaErrorInsufficientDriver */
#define TA_CU_ERR_NODEVICE 100 /* cudaErrorNoDevice */
#define TA_CU_STREAM_NONBLOCKING 1
#define TA_CU_EVENT_DISABLE_TIMING 2

/* X(name, return, parameters) for every entry point resolved with dlsym. */
#define TA_CUDART_FUNCS(X)                                                                         \
    X(cudaGetDeviceCount, ta_cuerr_t, (int *))                                                     \
    X(cudaSetDevice, ta_cuerr_t, (int))                                                            \
    X(cudaGetErrorString, const char *, (ta_cuerr_t))                                              \
    X(cudaHostRegister, ta_cuerr_t, (void *, size_t, unsigned int))                                \
    X(cudaHostUnregister, ta_cuerr_t, (void *))                                                    \
    X(cudaMalloc, ta_cuerr_t, (void **, size_t))                                                   \
    X(cudaFree, ta_cuerr_t, (void *))                                                              \
    X(cudaMemGetInfo, ta_cuerr_t, (size_t *, size_t *))                                            \
    X(cudaMemcpyAsync, ta_cuerr_t, (void *, const void *, size_t, TA_CU_KIND, ta_custream_t))      \
    X(cudaStreamCreateWithFlags, ta_cuerr_t, (ta_custream_t *, unsigned int))                      \
    X(cudaStreamDestroy, ta_cuerr_t, (ta_custream_t))                                              \
    X(cudaStreamSynchronize, ta_cuerr_t, (ta_custream_t))                                          \
    X(cudaEventCreateWithFlags, ta_cuerr_t, (ta_cuevent_t *, unsigned int))                        \
    X(cudaEventRecord, ta_cuerr_t, (ta_cuevent_t, ta_custream_t))                                  \
    X(cudaEventSynchronize, ta_cuerr_t, (ta_cuevent_t))                                            \
    X(cudaEventDestroy, ta_cuerr_t, (ta_cuevent_t))                                                \
    X(cudaGetLastError, ta_cuerr_t, (void))

#endif
