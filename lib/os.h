/* SPDX-License-Identifier: MIT */
/*
 * The OS layer: the only code that calls the kernel. Every function returns
 * 0 or a positive errno and never touches errno itself (the saved value is
 * restored). Addresses and sizes passed in are page aligned and sizes > 0
 * unless a function says otherwise. It calls nothing else of tensoralloc.
 */
#ifndef TA_OS_H
#define TA_OS_H

#include <stddef.h>
#include <stdint.h>

#define TA_HUGE_PAGE ((size_t)2 << 20)

/* Map size bytes of fresh zeroed anonymous memory aligned to align (a power
 * of two, >= the page size). */
int _ta_os_map(size_t size, size_t align, void **out);
int _ta_os_unmap(void *addr, size_t size);
/* Resize a mapping, moving it if needed; *out receives the new address. */
int _ta_os_remap(void *addr, size_t old_size, size_t new_size, void **out);
/* Resize, growing in place when addr is aligned and the range above is
 * free, else moving to
 * a destination aligned to align (moving between 2 MiB-aligned addresses
 * lets the kernel move huge-page entries whole instead of splitting them).
 * On failure the old mapping is untouched. */
int _ta_os_remap_aligned(void *addr, size_t old_size, size_t new_size, size_t align, void **out);
/* Move size bytes of mapped pages from `from` to `to`, replacing what was
 * mapped there (mremap MREMAP_FIXED: page tables move, nothing is copied
 * or zeroed; from must lie in one VMA on kernels before 6.17). */
int _ta_os_move(void *from, size_t size, void *to);
/* Resize without moving; ENOMEM if the range above is taken. */
int _ta_os_remap_in_place(void *addr, size_t old_size, size_t new_size);
int _ta_os_advise_hugepage(void *addr, size_t size);
/* Return the pages to the kernel; the range stays mapped and reads zero. */
int _ta_os_advise_dontneed(void *addr, size_t size);
/* Name an anonymous mapping ("[anon:NAME]" in /proc/self/maps); EINVAL or
 * ENOSYS where the kernel does not allow it. name must be static. */
int _ta_os_name(void *addr, size_t size, const char *name);

size_t _ta_os_page_size(void);
/* 1 if transparent huge pages are "always" or "madvise", else 0 (read
 * once). */
int _ta_os_thp_available(void);
/* Bytes of physical memory, 0 if unknown. */
size_t _ta_os_physical_memory(void);
/* vm.max_map_count, or 65530 if it cannot be read. */
long _ta_os_max_map_count(void);
/* The kernel's count of this process's mappings (VMAs: the lines of
 * /proc/self/maps, what vm.max_map_count limits); reads the whole file. */
int _ta_os_vma_count(long *out);
/* How many VMAs the calls made through this layer so far can have added at
 * most (merges only lower it); never decreases: a caller that counted
 * remembers this value with its count and adds what it grew by since. */
long _ta_os_vma_growth(void);
/* Resident set size of this process in bytes (VmRSS), 0 if unknown. */
size_t _ta_os_rss(void);
/* Monotonic milliseconds. */
uint64_t _ta_os_now_ms(void);
/* Write to stderr without allocating. */
void _ta_os_write_stderr(const char *buf, size_t len);
/* Read an environment variable from environ without allocating. */
const char *_ta_os_getenv(const char *name);

/* Counters of the kernel calls made so far (relaxed reads). */
typedef struct {
    uint64_t map, unmap, remap, madvise, map_failures, unmap_failures, advise_failures;
    uint64_t remap_failures; /* moving remaps (in-place growth may fail by design) */
    uint64_t injected;       /* failures made by the test hooks below */
} _ta_os_counters_t;
void _ta_os_counters(_ta_os_counters_t *out);

/* Test hooks: make the Nth map, remap, unmap or advise call from now fail
 * (ENOMEM; EAGAIN for advise) without calling the kernel; 0 disarms. Each
 * fires once. */
void _ta_os_fail_nth_map(long n);
void _ta_os_fail_nth_remap(long n);
void _ta_os_fail_nth_unmap(long n);
void _ta_os_fail_nth_advise(long n);
/* While on, every unmap fails with ENOMEM (what vm.max_map_count does to
 * unmaps that split a mapping). */
void _ta_os_fail_every_unmap(int on);
/* While on, every map fails with ENOMEM. */
void _ta_os_fail_every_map(int on);

#endif
