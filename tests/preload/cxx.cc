// SPDX-License-Identifier: MIT
// C++ under the preload library: new/delete in every form (sized, aligned,
// nothrow, arrays), std::vector growth, containers, and exceptions thrown
// and caught (the runtime allocates exception objects through malloc).
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

struct alignas(64) Cache {
    char bytes[192];
};
struct alignas(4096) Page {
    char bytes[4096 * 3];
};

static int failures = 0;
#define EXPECT(c)                                                                              \
    do {                                                                                       \
        if (!(c)) {                                                                            \
            std::printf("failed: %s (line %d)\n", #c, __LINE__);                              \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

int main()
{
    long total = 0;
    for (int i = 0; i < 2000; i++) {
        int *one = new int(i);
        int *arr = new int[i + 1];
        arr[i] = i;
        total += *one + arr[i];
        delete one;
        delete[] arr;
        Cache *c = new Cache;
        EXPECT(reinterpret_cast<std::uintptr_t>(c) % 64 == 0);
        delete c;
        Page *pg = new Page[2];
        EXPECT(reinterpret_cast<std::uintptr_t>(pg) % 4096 == 0);
        delete[] pg;
        void *nt = ::operator new(100, std::nothrow);
        ::operator delete(nt, std::nothrow);
        void *sized = ::operator new(333);
        ::operator delete(sized, 333);
        void *al = ::operator new(5000, std::align_val_t(2048));
        EXPECT(reinterpret_cast<std::uintptr_t>(al) % 2048 == 0);
        ::operator delete(al, 5000, std::align_val_t(2048));
    }
    std::vector<std::uint64_t> v;
    for (std::uint64_t i = 0; i < 5000000; i++)
        v.push_back(i * 3);
    std::uint64_t sum = 0;
    for (auto x : v)
        sum += x;
    std::map<std::string, std::vector<int>> m;
    for (int i = 0; i < 20000; i++)
        m["key-" + std::to_string(i % 997)].push_back(i);
    int caught = 0;
    for (int i = 0; i < 1000; i++) {
        try {
            if (i % 2)
                throw std::runtime_error("error number " + std::to_string(i));
            throw std::string(1000, 'x');
        } catch (const std::runtime_error &e) {
            caught += e.what()[0] == 'e';
        } catch (const std::string &s) {
            caught += s.size() == 1000;
        }
    }
    bool bad_alloc_seen = false;
    try {
        void *huge = ::operator new(SIZE_MAX / 2);
        ::operator delete(huge);
    } catch (const std::bad_alloc &) {
        bad_alloc_seen = true;
    }
    EXPECT(bad_alloc_seen);
    EXPECT(::operator new(SIZE_MAX / 2, std::nothrow) == nullptr);
    auto shared = std::make_shared<std::vector<double>>(1 << 20, 1.5);
    std::printf("cxx: total %ld sum %llu map %zu caught %d shared %.1f failures %d\n", total,
                (unsigned long long)sum, m.size(), caught, (*shared)[12345], failures);
    return failures != 0;
}
