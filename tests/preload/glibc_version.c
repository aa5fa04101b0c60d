/* SPDX-License-Identifier: MIT */
/*
 * Run under the preload library with fake_libc_version preloaded first:
 * the library must do what the glibc version TA_FAKE_GLIBC_VERSION names
 * would do. aligned_alloc: memalign before 2.38 (alignment 0 or 24 gives a
 * block), EINVAL for a non-power-of-two from 2.38. mallopt(M_MMAP_THRESHOLD,
 * v): 1 for any v from 2.35, 0 above 32 MiB (and for -1) before.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <gnu/libc-version.h>
#include <malloc.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

static void expect(bool ok, const char *what)
{
    printf("%s %s\n", ok ? "ok:  " : "FAIL:", what);
    failures += !ok;
}

static void aligned(size_t align, bool block_expected)
{
    char what[96];
    errno = 0;
    void *p = aligned_alloc(align, 64);
    int e = errno;
    bool ok = block_expected ? p != NULL && (uintptr_t)p % 16 == 0 : p == NULL && e == EINVAL;
    snprintf(what, sizeof what, "aligned_alloc(%zu, 64) gives %s", align,
             block_expected ? "a block" : "EINVAL");
    expect(ok, what);
    free(p);
}

int main(void)
{
    const char *fake = getenv("TA_FAKE_GLIBC_VERSION");
    if (fake == NULL || dlsym(RTLD_DEFAULT, "ta_stats_get") == NULL) {
        printf("run with TA_FAKE_GLIBC_VERSION set and the preload library preloaded\n");
        return 1;
    }
    expect(strcmp(gnu_get_libc_version(), fake) == 0, "the fake glibc version is in effect");
    int major = 0, minor = 0;
    sscanf(fake, "%d.%d", &major, &minor);
    int version = major * 1000 + minor;

    aligned(64, true);
    aligned(0, version < 2038);
    aligned(24, version < 2038);
    aligned(4097, version < 2038);

    bool any_threshold = version >= 2035;
    expect(mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1, "mallopt(M_MMAP_THRESHOLD, 1 MiB) = 1");
    expect(mallopt(M_MMAP_THRESHOLD, 64 << 20) == any_threshold,
           any_threshold ? "mallopt(M_MMAP_THRESHOLD, 64 MiB) = 1"
                         : "mallopt(M_MMAP_THRESHOLD, 64 MiB) = 0");
    expect(mallopt(M_MMAP_THRESHOLD, -1) == any_threshold,
           any_threshold ? "mallopt(M_MMAP_THRESHOLD, -1) = 1"
                         : "mallopt(M_MMAP_THRESHOLD, -1) = 0");
    return failures != 0;
}
