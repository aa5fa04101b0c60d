/* SPDX-License-Identifier: MIT */
/* Shared by the Criterion suites: RSS, patterns, and the hidden internals
 * (fault hooks) reachable because the suites link the static library. */
#ifndef TA_TEST_HELPERS_H
#define TA_TEST_HELPERS_H

#include "os/os.h"
#include "tensoralloc.h"

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MiB ((size_t)1 << 20)
#define KiB ((size_t)1 << 10)

/* Waits at most seconds for a forked child: a child that hangs is killed
 * and reported (returns false), so a deadlock fails one test by name
 * instead of hanging the whole suite past meson's timeout. */
static inline bool wait_child(pid_t pid, int seconds, int *status)
{
    for (int i = 0; i < seconds * 100; i++) {
        if (waitpid(pid, status, WNOHANG) == pid)
            return true;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, status, 0);
    return false;
}

static inline size_t rss_bytes(void)
{
    return _ta_os_rss();
}

/* A pattern that differs per block and per offset, so overlaps show. */
static inline void pattern_fill(void *p, size_t n, uint64_t seed)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(seed * 31 + i * 7 + (i >> 8));
}

static inline int pattern_ok(const void *p, size_t n, uint64_t seed)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != (unsigned char)(seed * 31 + i * 7 + (i >> 8)))
            return 0;
    return 1;
}

/* The address space this process has mapped (VmSize), 0 if unknown. */
static inline size_t vm_size_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kib = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmSize: %zu kB", &kib) == 1)
            break;
    if (f)
        fclose(f);
    return kib * KiB;
}

/* Touches one byte per page: cheap way to make pages resident. */
static inline void touch_pages(void *p, size_t n)
{
    for (size_t i = 0; i < n; i += 4096)
        ((volatile char *)p)[i] = (char)i;
}

/* Under valgrind the tool's own memory makes RSS figures meaningless. */
static inline int under_valgrind(void)
{
    const char *pre = getenv("LD_PRELOAD");
    return pre && strstr(pre, "vgpreload") != NULL;
}

/* Whether RSS says what the allocator holds: not under valgrind, nor under
 * AddressSanitizer, whose shadow pages for the memory a test writes count
 * too (1 GiB written: 128 MiB of shadow after it is all given back). */
static inline int rss_meaningful(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return 0;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    return 0;
#endif
#endif
    return !under_valgrind();
}

/* The kernel's mappings of this process (lines of /proc/self/maps). */
static inline long maps_lines(void)
{
    long n = -1;
    return _ta_os_vma_count(&n) == 0 ? n : -1;
}

static inline ta_stats_t stats_now(void)
{
    ta_stats_t st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    ta_stats_get(&st);
    return st;
}

/* In a Criterion test: skips it where the machine has no transparent huge
 * pages, and checks that THP=auto is the default the test relies on. */
#define REQUIRE_THP_AUTO()                                                                         \
    do {                                                                                           \
        if (!_ta_os_thp_available())                                                               \
            cr_skip_test("transparent huge pages are disabled on this machine");                   \
        long long thp_mode;                                                                        \
        cr_assert_eq(ta_option_get(TA_OPT_THP, &thp_mode), 0);                                     \
        cr_assert_eq(thp_mode, 2, "auto is the default");                                          \
    } while (0)

/* Finds the /proc/self/smaps entry holding p (neighbours with the same
 * flags and name are one entry) and copies it into buf. */
static inline int smaps_entry(const void *p, char *buf, size_t cap)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        return 0;
    char line[512];
    int found = 0;
    size_t used = 0;
    buf[0] = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end;
        if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            if (found)
                break;
            found = start <= (uintptr_t)p && (uintptr_t)p < end;
        }
        if (found && used + strlen(line) < cap) {
            strcpy(buf + used, line);
            used += strlen(line);
        }
    }
    fclose(f);
    return found;
}

/* Whether the mapping holding p is advised MADV_HUGEPAGE; a p with no
 * mapping, or smaps without VmFlags, aborts the test. */
static inline bool advised(const void *p)
{
    char buf[8192];
    const char *flags = smaps_entry(p, buf, sizeof buf) ? strstr(buf, "VmFlags:") : NULL;
    if (flags == NULL) {
        fprintf(stderr, "no smaps entry with VmFlags holds %p\n", p);
        abort();
    }
    return strstr(flags, " hg") != NULL;
}

#endif
