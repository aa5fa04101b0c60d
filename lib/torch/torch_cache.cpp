// SPDX-License-Identifier: MIT
/*
 * The model cache's entries as at::Tensors over their own memory
 * (include/tensoralloc_torch_cache.hpp): at::from_blob with a deleter that
 * holds the entry's lock. One lock per entry, shared by all its tensors
 * (a std::shared_ptr the deleters copy), released when the last storage
 * made from them is freed: the cache cannot evict memory a tensor uses,
 * and a server that drops its tensors makes the entry evictable again.
 */
#include "tensoralloc_torch_cache.hpp"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <memory>
#include <new>

namespace {

struct EntryLock {
    ta_entry_t *entry;
    explicit EntryLock(ta_entry_t *e) : entry(e) {}
    ~EntryLock() { ta_entry_unlock(entry); }
    EntryLock(const EntryLock &) = delete;
    EntryLock &operator=(const EntryLock &) = delete;
};

// The Python package's mapping (tools/python/tensoralloc TORCH_DTYPES),
// for the types libtorch 1.13 has.
c10::ScalarType scalar_type_of(ta_dtype_t dtype)
{
    switch (dtype) {
    case TA_DTYPE_BOOL: return c10::ScalarType::Bool;
    case TA_DTYPE_U8: return c10::ScalarType::Byte;
    case TA_DTYPE_I8: return c10::ScalarType::Char;
    case TA_DTYPE_U16: return c10::ScalarType::Short;
    case TA_DTYPE_I16: return c10::ScalarType::Short;
    case TA_DTYPE_F16: return c10::ScalarType::Half;
    case TA_DTYPE_BF16: return c10::ScalarType::BFloat16;
    case TA_DTYPE_U32: return c10::ScalarType::Int;
    case TA_DTYPE_I32: return c10::ScalarType::Int;
    case TA_DTYPE_F32: return c10::ScalarType::Float;
    case TA_DTYPE_U64: return c10::ScalarType::Long;
    case TA_DTYPE_I64: return c10::ScalarType::Long;
    case TA_DTYPE_F64: return c10::ScalarType::Double;
    case TA_DTYPE_F8_E4M3: return c10::ScalarType::Byte;
    case TA_DTYPE_F8_E5M2: return c10::ScalarType::Byte;
    case TA_DTYPE_COUNT_: break;
    }
    return c10::ScalarType::Undefined;
}

int make_tensors(const std::shared_ptr<EntryLock> &lock, tensoralloc::NamedTensors *out)
{
    ta_entry_t *entry = lock->entry;
    size_t count = ta_entry_tensor_count(entry);
    out->reserve(count);
    for (size_t i = 0; i < count; i++) {
        ta_tensor_t t;
        if (ta_entry_tensor_at(entry, i, &t) != 0)
            return EINVAL;
        c10::ScalarType type = scalar_type_of(t.dtype);
        if (type == c10::ScalarType::Undefined || (t.data == nullptr && t.nbytes > 0))
            return EINVAL; // no host copy: the entry is on the device only
        std::vector<int64_t> sizes(t.shape, t.shape + t.ndim);
        auto options = at::TensorOptions().dtype(type).device(c10::kCPU);
        // A tensor of no elements has no memory to hold on to.
        at::Tensor tensor = t.nbytes == 0 ? at::empty(sizes, options)
                                          : at::from_blob(t.data, sizes, [lock](void *) {}, options);
        out->emplace_back(t.name, std::move(tensor));
    }
    return 0;
}

} // namespace

int tensoralloc::entry_tensors(ta_entry_t *entry, NamedTensors *out)
{
    out->clear();
    std::shared_ptr<EntryLock> lock;
    try {
        lock = std::make_shared<EntryLock>(entry);
    } catch (const std::bad_alloc &) {
        ta_entry_unlock(entry);
        return ENOMEM;
    }
    int rc;
    try {
        rc = make_tensors(lock, out);
    } catch (const std::bad_alloc &) {
        rc = ENOMEM;
    } catch (const c10::Error &) {
        rc = EINVAL; // libtorch refused the tensor
    }
    if (rc != 0)
        out->clear(); // the tensors' copies of the lock go; ours below
    return rc;
}
