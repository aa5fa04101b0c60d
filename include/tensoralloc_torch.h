/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc as PyTorch's CPU allocator, in a running process and without
 * LD_PRELOAD (libtensoralloc-torch.so, built when libtorch's headers and
 * libc10 are found). Every CPU tensor created after ta_torch_install()
 * takes its memory from tensoralloc: a mapping of its own above the
 * threshold, back to the kernel on free; a slab block below it. Tensors
 * made before keep their own deleters, so blocks from either allocator are
 * freed correctly after a switch in either direction.
 *
 * ABI rule: the shim is C++ against libc10's classes, so it must be built
 * against the torch it runs with (same version, same C++ ABI):
 * ta_torch_built_for() says which one it was built against.
 */
#ifndef TENSORALLOC_TORCH_H
#define TENSORALLOC_TORCH_H

#include "tensoralloc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Makes tensoralloc the CPU allocator (c10::SetCPUAllocator at priority
 * 0). 0 on success, also when already installed; EBUSY when PyTorch keeps
 * another allocator (one set with a higher priority). */
TA_API int ta_torch_install(void);
/* Puts back the allocator that was in force before ta_torch_install().
 * 0 on success; EINVAL when not installed; EBUSY when another allocator
 * was installed over tensoralloc's since (it stays in force). */
TA_API int ta_torch_uninstall(void);
/* 1 while tensoralloc is PyTorch's CPU allocator, else 0. */
TA_API int ta_torch_installed(void);
/* The libtorch the shim was built against: "1.13.0", and its C++ ABI
 * (1: _GLIBCXX_USE_CXX11_ABI, as torch._C._GLIBCXX_USE_CXX11_ABI). */
TA_API const char *ta_torch_built_for(void);
TA_API int ta_torch_cxx11_abi(void);

#ifdef __cplusplus
}
#endif

#endif
