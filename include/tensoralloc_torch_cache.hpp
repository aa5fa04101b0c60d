/* SPDX-License-Identifier: MIT */
/*
 * tensoralloc's model cache to libtorch, with no copy (C++ only; in
 * libtensoralloc-torch.so when the model cache is built): the tensors of
 * a cache entry as at::Tensors over the entry's own memory, for a C++
 * server that loads its weights through ta_cache (parallel readers, the
 * budgets) and runs them on libtorch. docs/cpp.md has a whole program.
 *
 *     ta_entry_t *entry;
 *     tensoralloc::NamedTensors weights;
 *     if (ta_cache_load_safetensors(cache, "unet", "unet.safetensors", &entry) == 0 &&
 *         tensoralloc::entry_tensors(entry, &weights) == 0)      // takes the lock over
 *         for (const auto &p : module.named_parameters())        // and named_buffers()
 *             p.value.set_data(find(weights, p.name));           // dotted state_dict names
 *     // the entry stays locked until the last of these tensors is gone
 *
 * Like the shim, built against the libtorch it runs with (docs/python.md,
 * "The ABI rule").
 */
#ifndef TENSORALLOC_TORCH_CACHE_HPP
#define TENSORALLOC_TORCH_CACHE_HPP

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "tensoralloc_cache.h"
#include "tensoralloc_torch.h"

namespace tensoralloc {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

/* Fills *out with the tensors of entry, in its order, named as in the
 * file: contiguous CPU tensors made by at::from_blob over the entry's
 * host memory, nothing copied. It takes over the caller's lock of entry
 * (from ta_cache_get or a load): the lock goes when the last of these
 * tensors, and of the views and storages made from them, is gone, so the
 * cache never evicts memory under a tensor. Every such tensor must be gone
 * before ta_cache_destroy (which frees locked entries too: a tensor dropped
 * after it unlocks freed memory). The memory is the cache's,
 * shared by every holder of the entry: read it, do not write it.
 * safetensors types libtorch 1.13 lacks come as the same bits in the type
 * the Python package uses (U16 as int16, U32 as int32, U64 as int64,
 * F8_E4M3 and F8_E5M2 as uint8). Returns 0; EINVAL for an entry without a
 * host copy (on the device only) or a tensor libtorch refuses, ENOMEM when
 * memory for the tensor objects runs out; on failure *out is empty and
 * the lock released. */
TA_API int entry_tensors(ta_entry_t *entry, NamedTensors *out);

} // namespace tensoralloc

#endif
