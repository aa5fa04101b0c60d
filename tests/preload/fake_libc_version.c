/* SPDX-License-Identifier: MIT */
/*
 * Preloaded ahead of the preload library by the glibc-version tests: a
 * gnu_get_libc_version that answers TA_FAKE_GLIBC_VERSION, so that what
 * the library does by glibc version (aligned_alloc's check from 2.38,
 * mallopt's M_MMAP_THRESHOLD bound before 2.35) is tested on any glibc.
 */
#include <gnu/libc-version.h>
#include <stdlib.h>

__attribute__((visibility("default"))) const char *gnu_get_libc_version(void)
{
    const char *v = getenv("TA_FAKE_GLIBC_VERSION");
    return v ? v : "2.36";
}
