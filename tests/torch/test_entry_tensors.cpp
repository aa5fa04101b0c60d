// SPDX-License-Identifier: MIT
// tensoralloc::entry_tensors (lib/torch/torch_cache.cpp): the cache's
// entries as at::Tensors over their own memory, the entry locked while any
// of them, or a view of them, lives. TAP output.
#include <ATen/ATen.h>

#include <tensoralloc_cache.h>
#include <tensoralloc_torch_cache.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static int tests, failures;

static void check(bool ok, const std::string &what)
{
    tests++;
    if (!ok)
        failures++;
    std::printf("%s %d - %s\n", ok ? "ok" : "not ok", tests, what.c_str());
}

static ta_cache_t *new_cache(size_t vram)
{
    ta_cache_config_t config = {};
    config.size = sizeof config;
    config.ram_budget = size_t(64) << 20;
    config.vram_budget = vram;
    ta_cache_t *cache = nullptr;
    if (ta_cache_create(&config, &cache) != 0) {
        std::printf("Bail out! ta_cache_create\n");
        std::exit(1);
    }
    return cache;
}

// An entry of three tensors built in memory: w (F32 4x1000, 0..3999), u
// (U16 3, 65535 1 2) and e (F32 0x5, no bytes).
static void build_entry(ta_cache_t *cache, const char *key)
{
    ta_entry_t *entry;
    void *data;
    int64_t w_shape[] = {4, 1000}, u_shape[] = {3}, e_shape[] = {0, 5};
    if (ta_cache_create_entry(cache, key, &entry) != 0 ||
        ta_entry_add_tensor(entry, "w", TA_DTYPE_F32, 2, w_shape, &data) != 0) {
        std::printf("Bail out! building %s\n", key);
        std::exit(1);
    }
    for (int i = 0; i < 4000; i++)
        static_cast<float *>(data)[i] = float(i);
    uint16_t u[] = {65535, 1, 2};
    if (ta_entry_add_tensor(entry, "u", TA_DTYPE_U16, 1, u_shape, &data) != 0) {
        std::printf("Bail out! building %s\n", key);
        std::exit(1);
    }
    std::memcpy(data, u, sizeof u);
    if (ta_entry_add_tensor(entry, "e", TA_DTYPE_F32, 2, e_shape, &data) != 0) {
        std::printf("Bail out! building %s\n", key);
        std::exit(1);
    }
    ta_entry_unlock(entry); // complete
}

static void tensors_are_the_entrys_memory()
{
    ta_cache_t *cache = new_cache(0);
    build_entry(cache, "m");
    ta_entry_t *entry;
    ta_cache_get(cache, "m", &entry);
    ta_tensor_t w;
    ta_entry_tensor(entry, "w", &w);
    tensoralloc::NamedTensors tensors;
    int rc = tensoralloc::entry_tensors(entry, &tensors);
    check(rc == 0 && tensors.size() == 3, "three tensors, rc " + std::to_string(rc));
    check(tensors[0].first == "w" && tensors[1].first == "u" && tensors[2].first == "e",
          "named and in the entry's order");
    const at::Tensor &tw = tensors[0].second;
    check(tw.data_ptr() == w.data && tw.sizes() == at::IntArrayRef({4, 1000}) &&
              tw.scalar_type() == at::kFloat && tw.is_contiguous(),
          "w is a float32 4x1000 tensor over the entry's memory (no copy)");
    check(tw[3][999].item<float>() == 3999.0f && tw.sum().item<double>() == 3999.0 * 4000 / 2,
          "w holds the entry's values");
    const at::Tensor &tu = tensors[1].second;
    check(tu.scalar_type() == at::kShort && tu[0].item<int16_t>() == -1 &&
              tu[2].item<int16_t>() == 2,
          "U16 comes as int16, the same bits (as the Python package)");
    check(tensors[2].second.numel() == 0 && tensors[2].second.sizes() == at::IntArrayRef({0, 5}),
          "a tensor of no elements keeps its shape");

    check(ta_cache_remove(cache, "m") == EBUSY, "the entry is locked while its tensors live");
    at::Tensor view = tw.slice(0, 1, 2);
    tensors.clear();
    check(ta_cache_remove(cache, "m") == EBUSY, "a view alone keeps the entry locked");
    check(view[0][0].item<float>() == 1000.0f, "the view reads the entry's memory");
    view = at::Tensor();
    check(ta_cache_remove(cache, "m") == 0, "the last view gone, the entry is unlocked");
    ta_cache_destroy(cache);
}

static void one_lock_per_call()
{
    ta_cache_t *cache = new_cache(0);
    build_entry(cache, "m");
    ta_entry_t *a, *b;
    ta_cache_get(cache, "m", &a);
    ta_cache_get(cache, "m", &b);
    tensoralloc::NamedTensors first, second;
    check(tensoralloc::entry_tensors(a, &first) == 0 && tensoralloc::entry_tensors(b, &second) == 0,
          "two calls on two locks");
    first.clear();
    check(ta_cache_remove(cache, "m") == EBUSY, "the second call's tensors keep their lock");
    second.clear();
    check(ta_cache_remove(cache, "m") == 0, "each call released exactly its own lock");
    ta_cache_destroy(cache);
}

static void an_entry_on_the_device_only_is_refused_and_unlocked()
{
    if (std::getenv("TENSORALLOC_CUDART") == nullptr) {
        std::printf("ok %d # SKIP no test CUDA runtime (TENSORALLOC_CUDART)\n", ++tests);
        return;
    }
    ta_cache_config_t config = {};
    config.size = sizeof config;
    config.ram_budget = size_t(64) << 20;
    config.vram_budget = size_t(64) << 20;
    config.keep_ram_copy = false;
    ta_cache_t *cache = nullptr;
    ta_cache_create(&config, &cache);
    build_entry(cache, "m");
    ta_entry_t *entry;
    ta_cache_get(cache, "m", &entry);
    int moved = ta_entry_to_device(entry);
    tensoralloc::NamedTensors tensors;
    int rc = tensoralloc::entry_tensors(entry, &tensors);
    check(moved == 0 && rc == EINVAL && tensors.empty(),
          "no host copy: EINVAL, nothing made (moved " + std::to_string(moved) + ", rc " +
              std::to_string(rc) + ")");
    check(ta_cache_remove(cache, "m") == 0, "and the lock it was given is released");
    ta_cache_destroy(cache);
}

int main()
{
    tensors_are_the_entrys_memory();
    one_lock_per_call();
    an_entry_on_the_device_only_is_refused_and_unlocked();
    std::printf("1..%d\n", tests);
    return failures == 0 ? 0 : 1;
}
