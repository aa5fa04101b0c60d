/* SPDX-License-Identifier: MIT */
/*
 * The OS layer: the only code that calls the kernel. Every function returns
 * 0 or a positive errno and never touches errno itself (the saved value is
 * restored). Addresses and sizes passed in are page aligned and sizes > 0
 * unless a function says otherwise. It calls nothing else of tensoralloc.
 */
#ifndef TA_OS_H
#define TA_OS_H

#include <stdbool.h>
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
 * On failure the old mapping is untouched (and TA_OS_DEST_LOST as for
 * _ta_os_move, with nothing of ours left to unmap). */
int _ta_os_remap_aligned(void *addr, size_t old_size, size_t new_size, size_t align, void **out);
/* Move size bytes of mapped pages from `from` to `to`, replacing what was
 * mapped there (mremap MREMAP_FIXED: page tables move, nothing is copied
 * or zeroed). On failure `from` is untouched and `to` is as it was, its
 * pages perhaps fresh: kernels before 6.17 unmap the destination before
 * they refuse a source that spans several VMAs (a block the program
 * mprotected, madvised or mlocked in part), and the hole is mapped again
 * at once (MAP_FIXED_NOREPLACE). TA_OS_DEST_LOST when another thread mapped
 * into the hole first: [to, to + size) is no longer ours, never touch or
 * unmap it. */
int _ta_os_move(void *from, size_t size, void *to);
#define TA_OS_DEST_LOST EADDRNOTAVAIL
/* Resize without moving; ENOMEM if the range above is taken. */
int _ta_os_remap_in_place(void *addr, size_t old_size, size_t new_size);
int _ta_os_advise_hugepage(void *addr, size_t size);
/* Residency of [addr, addr + size) (mincore; page aligned), by
 * `region`-aligned regions (a power of two: a huge page): */
typedef struct {
    size_t resident;                    /* pages present */
    size_t spanned;                     /* pages of the regions with any page present, counting
                                           only pages in the range: what huge pages would take */
    size_t last_resident, last_spanned; /* of the last such region */
} ta_residency_t;
/* ENOMEM if part of the range is not mapped. */
int _ta_os_residency(const void *addr, size_t size, size_t region, ta_residency_t *out);
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
/* 1 when the calling thread is the process's only live thread (an
 * ended leader, a zombie until the group ends, does not count). */
int _ta_os_only_thread_left(void); /* 1 or 0 */
/* Monotonic milliseconds, and seconds to the nanosecond (timings). */
uint64_t _ta_os_now_ms(void);
double _ta_os_now_s(void);
/* Write to stderr without allocating. */
void _ta_os_write_stderr(const char *buf, size_t len);
/* Read an environment variable from environ without allocating. */
const char *_ta_os_getenv(const char *name);

/* ---- files and threads: the model cache's loader ------------------------- */
/* Open path for reading; with direct, O_DIRECT (EINVAL where the
 * filesystem refuses it, as tmpfs does). */
int _ta_os_open_read(const char *path, int direct, int *fd);
void _ta_os_close(int fd);
int _ta_os_file_size(int fd, uint64_t *out);
/* One pread of at most len bytes at off (EINTR retried); *got is 0 at the
 * end of the file. */
int _ta_os_read_at(int fd, void *buf, size_t len, uint64_t off, size_t *got);
typedef enum { TA_OS_FADV_SEQUENTIAL, TA_OS_FADV_WILLNEED, TA_OS_FADV_DONTNEED } ta_os_fadvice_t;
/* posix_fadvise over [off, off + len); len 0: to the end of the file. */
int _ta_os_fadvise(int fd, uint64_t off, uint64_t len, ta_os_fadvice_t advice);
/* Fault the pages of a mapped range in, writable, now (MADV_POPULATE_WRITE;
 * EINVAL on kernels before 5.14). The contents are unchanged. */
int _ta_os_populate_write(void *addr, size_t size);
/* Map size bytes of file fd from its start, private and writable: its
 * pages are the page cache's until written (then copied). An access past
 * the end of the file (it shrank) raises SIGBUS: the model cache's file
 * guard (lib/cache/file_guard.c) prevents that. From 2 MiB up the mapping
 * starts on a huge-page boundary. */
int _ta_os_map_file(int fd, size_t size, void **out);
/* Fault a mapped range in for reading now (MADV_POPULATE_READ; EINVAL on
 * kernels before 5.14); EFAULT where a file mapping ends past its file. */
int _ta_os_populate_read(void *addr, size_t size);
/* ---- file leases: the kernel's warning before a file changes -------------- */
/* A read lease on fd (opened read-only) whose break (another open for
 * writing, a truncate) sends signal sig to thread tid alone (F_SETSIG,
 * F_SETLEASE, F_SETOWN_EX; then sig to tid once, since a break between
 * the last two went to the process instead). EAGAIN: the file is open for writing;
 * EACCES: not the caller's file (CAP_LEASE); EINVAL: its filesystem has no
 * leases. */
int _ta_os_lease(int fd, int sig, int tid);
/* Whether fd's lease is still whole: false once a break began (or it was
 * taken away). */
bool _ta_os_lease_held(int fd);
/* Copies len bytes from src to dst, both this process's, without a fault:
 * *got stops short where src cannot be read (a file mapping past the end
 * of its file), where a plain copy would raise SIGBUS (process_vm_readv). */
int _ta_os_copy_checked(void *dst, const void *src, size_t len, size_t *got);
/* Gives the lease up (the opener that broke it goes on). */
void _ta_os_lease_release(int fd);
/* The calling thread's id (gettid). */
int _ta_os_thread_tid(void);
/* The signal lease breaks come as: SIGURG, whose default action is to be
 * ignored, so one that reaches the process rather than the guard thread
 * (between F_SETLEASE and F_SETOWN_EX) cannot end it. */
int _ta_os_lease_signal(void);
/* Waits until sig, blocked in the calling thread, is pending for it and
 * takes it. */
void _ta_os_wait_signal(int sig);
/* Start a joinable thread running fn(arg); *id names it for the join. */
int _ta_os_thread_start(void *(*fn)(void *), void *arg, unsigned long *id);
void _ta_os_thread_join(unsigned long id);
/* Threads and time for the allocator's own background work: */
/* Starts a detached thread with a stack of stack bytes (0: the thread
 * library's default) and every signal blocked, so that none is delivered
 * to it (the caller's mask is kept). */
int _ta_os_background_thread(void *(*fn)(void *), size_t stack);
/* The calling thread lets the signals it blocked through (before it ends). */
void _ta_os_unblock_signals(void);
/* A key whose destructor runs when each thread that set it ends (the
 * C library's thread-specific data: how a thread's end reaches the slabs). */
typedef unsigned ta_os_key_t;
int _ta_os_key_create(ta_os_key_t *key, void (*destructor)(void *));
void _ta_os_key_set(ta_os_key_t key, const void *value);
/* Handlers around fork (pthread_atfork). */
int _ta_os_at_fork(void (*prepare)(void), void (*parent)(void), void (*child)(void));
int _ta_os_pid(void);
void _ta_os_yield(void);
void _ta_os_sleep_ms(long ms);
/* The time ms from now on the realtime (monotonic: false) or monotonic
 * clock, as a condition variable's timed wait takes it. */
struct timespec;
void _ta_os_deadline(bool monotonic, uint64_t ms, struct timespec *out);
/* Whether the C library has set environ yet (not during the dynamic
 * loader's first allocations). */
bool _ta_os_environ_ready(void);
/* Processors online, at least 1. */
int _ta_os_cpu_count(void);
/* This process's cgroup memory limit in bytes (its v2 group's memory.max,
 * else its v1 memory group's hierarchical limit), 0 if there is none or it
 * cannot be read (os_pressure.c). */
size_t _ta_os_cgroup_memory_limit(void);

/* ---- memory pressure (os_pressure.c): the purge thread's watcher --------- */
/* Where a wait's wake-up came from. */
enum {
    TA_OS_PRESSURE_WAKE = 1,    /* _ta_os_pressure_wake: other work */
    TA_OS_PRESSURE_MACHINE = 2, /* /proc/pressure/memory's trigger */
    TA_OS_PRESSURE_CGROUP2 = 4, /* the cgroup v2 group's memory.pressure trigger */
    TA_OS_PRESSURE_CGROUP1 = 8, /* the v1 memory group: vmpressure "medium" or usage
                                   past 7/8 of its limit */
};
/* Opens the process's one watcher (closing an earlier one): its wake-up
 * eventfd and, when listen is set, the triggers this machine and the
 * process's groups have. Returns the TA_OS_PRESSURE_* sources opened
 * (without WAKE); _ta_os_pressure_wakeable says whether the wake-up is. */
unsigned _ta_os_pressure_open(bool listen);
void _ta_os_pressure_close(void);
/* A _Fork child: the parent's descriptors are dropped without a close
 * (the child may have closed and reused their numbers). */
void _ta_os_pressure_forget(void);
bool _ta_os_pressure_wakeable(void);
/* Ends a wait now or the next one at once (async-signal-safe, no lock). */
void _ta_os_pressure_wake(void);
/* Sleeps up to timeout_ms (-1: no bound) until a source fires or a wake;
 * returns the sources that fired (0 on a timeout). */
unsigned _ta_os_pressure_wait(long timeout_ms);
/* The kernel's figures in one line ("machine avg10=0.52 ..., cgroup
 * usage 590 of 600 MiB"): the length written, as snprintf. */
int _ta_os_pressure_figure(char *out, size_t len);
/* The watched v1 or v2 group's memory in use, and the v1 group's
 * hierarchical limit (0 where unknown; both after _ta_os_pressure_open). */
uint64_t _ta_os_cgroup_usage(void);
uint64_t _ta_os_cgroup_v1_limit(void);
/* In use less the page cache's file pages (v1; v2: in use). */
uint64_t _ta_os_cgroup_working_set(void);

/* Counters of the kernel calls made so far (relaxed reads). */
typedef struct {
    uint64_t map, unmap, remap, madvise, map_failures, unmap_failures, advise_failures;
    uint64_t remap_failures; /* moving remaps (in-place growth may fail by design) */
    uint64_t injected;       /* failures made by the test hooks below */
} _ta_os_counters_t;
void _ta_os_counters(_ta_os_counters_t *out);

/* ---- test hooks: defined only in the test build of the OS layer --------------
 * (TA_TEST_HOOKS, lib/os/faults.c, which the test suites link through
 * meson's tensoralloc_internal_dep); the shipped libraries have none.
 * Make the Nth map, remap, unmap or advise call from now fail
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

/* A test's read hook: called before every _ta_os_read_at with the request;
 * it may shorten *len (a short read), do something to the file (shrink
 * it), or return an errno the read then fails with. NULL removes it. */
typedef int (*ta_os_read_hook_t)(void *arg, int fd, size_t *len, uint64_t off);
void _ta_os_set_read_hook(ta_os_read_hook_t hook, void *arg);
/* While on, O_DIRECT opens fail with EINVAL, as on a filesystem without
 * direct I/O. */
void _ta_os_refuse_direct(int on);
/* Emulates kernels before 6.17 (1): a move whose source spans several
 * VMAs unmaps its destination, then fails with EFAULT; 2 also maps one
 * page into that hole at once, as another thread could, and reports it
 * through _ta_os_emulated_intruder (NULL if none yet). 0 is the kernel's
 * own behaviour. */
void _ta_os_emulate_old_mremap(int mode);
void *_ta_os_emulated_intruder(void);
/* Called before every unmap, in the unmapping thread (tests: to hold a
 * thread in the middle of its work); NULL removes it. */
void _ta_os_set_unmap_hook(void (*hook)(void *addr, size_t size));
/* Make the Nth thread start from now fail (EAGAIN); 0 disarms. */
void _ta_os_fail_nth_thread(long n);

#endif
