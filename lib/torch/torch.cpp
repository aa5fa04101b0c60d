// SPDX-License-Identifier: MIT
/*
 * tensoralloc as PyTorch's CPU allocator (include/tensoralloc_torch.h):
 * a c10::Allocator whose blocks come from ta_aligned_alloc, installed with
 * c10::SetCPUAllocator, the hook PyTorch keeps for this
 * (c10/core/CPUAllocator.h). What c10's DefaultCPUAllocator does around
 * its blocks is kept: 64-byte alignment (c10::gAlignment, what vectorised
 * kernels assume), no block for 0 bytes, and the report to the memory
 * profiler (torch.profiler's profile_memory sees these tensors too).
 *
 * The only C++ file of the library, and the only one that knows libc10:
 * built into libtensoralloc-torch.so when libtorch's headers are found.
 */
#include "tensoralloc_torch.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/csrc/api/include/torch/version.h>

#include <cerrno>
#include <mutex>

namespace {

constexpr size_t tensor_alignment = 64; // c10::gAlignment

void free_tensor_block(void *p)
{
    c10::profiledCPUMemoryReporter().Delete(p);
    ta_free(p);
}

struct TensorallocAllocator final : c10::Allocator {
    c10::DataPtr allocate(size_t nbytes) const override
    {
        void *p = nullptr;
        if (nbytes > 0) {
            p = ta_aligned_alloc(tensor_alignment, nbytes);
            // c10::Error, as DefaultCPUAllocator throws: Python sees a RuntimeError.
            TORCH_CHECK(p != nullptr, "tensoralloc: out of memory: tried to allocate ", nbytes,
                        " bytes for a CPU tensor");
            c10::profiledCPUMemoryReporter().New(p, nbytes);
        }
        return {p, p, &free_tensor_block, c10::Device(c10::DeviceType::CPU)};
    }

    c10::DeleterFnPtr raw_deleter() const override { return &free_tensor_block; }
};

TensorallocAllocator tensoralloc_allocator;
c10::Allocator *previous_allocator; // guarded by install_mutex
std::mutex install_mutex;

} // namespace

extern "C" int ta_torch_install(void)
{
    std::lock_guard<std::mutex> guard(install_mutex);
    c10::Allocator *now = c10::GetCPUAllocator();
    if (now == &tensoralloc_allocator)
        return 0;
    c10::SetCPUAllocator(&tensoralloc_allocator, 0);
    // SetCPUAllocator keeps an allocator set with a higher priority.
    if (c10::GetCPUAllocator() != &tensoralloc_allocator)
        return EBUSY;
    previous_allocator = now;
    return 0;
}

extern "C" int ta_torch_uninstall(void)
{
    std::lock_guard<std::mutex> guard(install_mutex);
    c10::Allocator *now = c10::GetCPUAllocator();
    if (previous_allocator == nullptr)
        return EINVAL;
    if (now != &tensoralloc_allocator)
        return EBUSY; // someone installed over ours: theirs stays
    c10::SetCPUAllocator(previous_allocator, 0);
    previous_allocator = nullptr;
    return 0;
}

extern "C" int ta_torch_installed(void)
{
    return c10::GetCPUAllocator() == &tensoralloc_allocator;
}

extern "C" const char *ta_torch_built_for(void)
{
    return TORCH_VERSION;
}

extern "C" int ta_torch_cxx11_abi(void)
{
#if defined(_GLIBCXX_USE_CXX11_ABI) && _GLIBCXX_USE_CXX11_ABI
    return 1;
#else
    return 0;
#endif
}
