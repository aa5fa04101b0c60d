/* SPDX-License-Identifier: MIT */
/*
 * The OS layer's other calls (Linux): the /proc and /sys reads (huge
 * pages, memory, the map-count limit, the cgroup limit, threads left), the
 * clock, the environment and stderr, file reads, threads, yields and
 * sleeps. Nothing here allocates from the heap. Memory calls are
 * os_memory.c's.
 */
#define _GNU_SOURCE
#include "faults.h"
#include "os.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static long read_small_file(const char *path, char *buf, size_t cap)
{
    int saved = errno;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    long total = -1;
    if (fd >= 0) {
        total = 0;
        while ((size_t)total < cap - 1) {
            ssize_t n = read(fd, buf + total, cap - 1 - (size_t)total);
            if (n <= 0)
                break;
            total += n;
        }
        buf[total] = '\0';
        close(fd);
    }
    errno = saved;
    return total;
}

int _ta_os_thp_available(void)
{
    static _Atomic int cached = -1; /* read once: the hot path asks often */
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        char buf[128];
        v = read_small_file("/sys/kernel/mm/transparent_hugepage/enabled", buf, sizeof buf) > 0 &&
            strstr(buf, "[never]") == NULL;
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}

size_t _ta_os_physical_memory(void)
{
    int saved = errno;
    long pages = sysconf(_SC_PHYS_PAGES);
    errno = saved;
    return pages > 0 ? (size_t)pages * _ta_os_page_size() : 0;
}

static long parse_long(const char *s)
{
    long v = 0;
    while (*s == ' ' || *s == '\t')
        s++;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    return v;
}

long _ta_os_max_map_count(void)
{
    char buf[64];
    if (read_small_file("/proc/sys/vm/max_map_count", buf, sizeof buf) <= 0)
        return 65530;
    long v = parse_long(buf);
    return v > 0 ? v : 65530;
}

size_t _ta_os_rss(void)
{
    char buf[4096];
    if (read_small_file("/proc/self/status", buf, sizeof buf) <= 0)
        return 0;
    const char *line = strstr(buf, "VmRSS:");
    return line ? (size_t)parse_long(line + 6) * 1024 : 0;
}

/* /proc/self/stat describes the thread-group leader: its state (Z once
 * it has ended while other threads live on) and the group's thread count,
 * the ended leader included. */
int _ta_os_only_thread_left(void)
{
    char buf[1024];
    if (read_small_file("/proc/self/stat", buf, sizeof buf) <= 0)
        return 0;
    const char *p = strrchr(buf, ')'); /* the name may hold spaces and ')' */
    if (p == NULL || p[1] != ' ')
        return 0;
    char state = p[2];
    p += 2;
    for (int field = 3; field < 20; field++) { /* on to field 20, num_threads */
        p = strchr(p, ' ');
        if (p == NULL)
            return 0;
        p++;
    }
    long threads = parse_long(p);
    return threads - (state == 'Z') <= 1;
}

uint64_t _ta_os_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

double _ta_os_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void _ta_os_write_stderr(const char *buf, size_t len)
{
    int saved = errno;
    while (len > 0) {
        ssize_t n = write(2, buf, len);
        if (n <= 0)
            break;
        buf += n;
        len -= (size_t)n;
    }
    errno = saved;
}

const char *_ta_os_getenv(const char *name)
{
    size_t len = strlen(name);
    if (environ == NULL)
        return NULL;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
            return *e + len + 1;
    return NULL;
}

/* ---- files and threads ----------------------------------------------------- */

int _ta_os_open_read(const char *path, int direct, int *fd)
{
    if (direct && _ta_fault_fires(TA_FAULT_DIRECT))
        return EINVAL;
    int saved = errno;
    int f = open(path, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    int rc = f < 0 ? errno : 0;
    errno = saved;
    if (rc == 0)
        *fd = f;
    return rc;
}

void _ta_os_close(int fd)
{
    int saved = errno;
    close(fd);
    errno = saved;
}

int _ta_os_file_size(int fd, uint64_t *out)
{
    int saved = errno;
    struct stat st;
    int rc = fstat(fd, &st) == 0 ? 0 : errno;
    errno = saved;
    if (rc == 0)
        *out = (uint64_t)st.st_size;
    return rc;
}

int _ta_os_read_at(int fd, void *buf, size_t len, uint64_t off, size_t *got)
{
    int hooked = _ta_fault_read(fd, &len, off);
    if (hooked)
        return hooked;
    int saved = errno;
    ssize_t n;
    do
        n = pread(fd, buf, len, (off_t)off);
    while (n < 0 && errno == EINTR);
    int rc = n < 0 ? errno : 0;
    errno = saved;
    if (rc == 0)
        *got = (size_t)n;
    return rc;
}

int _ta_os_fadvise(int fd, uint64_t off, uint64_t len, ta_os_fadvice_t advice)
{
    static const int advices[] = {[TA_OS_FADV_SEQUENTIAL] = POSIX_FADV_SEQUENTIAL,
                                  [TA_OS_FADV_WILLNEED] = POSIX_FADV_WILLNEED,
                                  [TA_OS_FADV_DONTNEED] = POSIX_FADV_DONTNEED};
    return posix_fadvise(fd, (off_t)off, (off_t)len, advices[advice]); /* returns the error */
}

int _ta_os_thread_start(void *(*fn)(void *), void *arg, unsigned long *id)
{
    if (_ta_fault_fires(TA_FAULT_THREAD))
        return EAGAIN;
    pthread_t t;
    int rc = pthread_create(&t, NULL, fn, arg);
    if (rc == 0)
        *id = (unsigned long)t;
    return rc;
}

void _ta_os_thread_join(unsigned long id)
{
    pthread_join((pthread_t)id, NULL);
}

int _ta_os_background_thread(void *(*fn)(void *), size_t stack)
{
    int saved = errno; /* pthread_create's own failures set it (its stack's mmap) */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread inherits "all blocked" */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (stack)
        pthread_attr_setstacksize(&attr, stack);
    pthread_t tid;
    int rc = pthread_create(&tid, &attr, fn, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = saved;
    return rc;
}

void _ta_os_unblock_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
}

int _ta_os_lease(int fd, int sig, int tid)
{
    int saved = errno, rc = 0;
    /* F_SETLEASE points the break at the whole process; F_SETOWN_EX after
     * it, at the one thread that waits for it */
    struct f_owner_ex owner = {F_OWNER_TID, tid};
    if (fcntl(fd, F_SETSIG, sig) != 0 || fcntl(fd, F_SETLEASE, F_RDLCK) != 0)
        rc = errno;
    else if (fcntl(fd, F_SETOWN_EX, &owner) != 0) {
        rc = errno;
        fcntl(fd, F_SETLEASE, F_UNLCK);
    } else {
        syscall(SYS_tgkill, getpid(), tid, sig); /* a break in between: the thread looks */
    }
    errno = saved;
    return rc;
}

bool _ta_os_lease_held(int fd)
{
    int saved = errno;
    bool held = fcntl(fd, F_GETLEASE) == F_RDLCK; /* F_UNLCK while a break is pending */
    errno = saved;
    return held;
}

void _ta_os_lease_release(int fd)
{
    int saved = errno;
    fcntl(fd, F_SETLEASE, F_UNLCK);
    errno = saved;
}

int _ta_os_copy_checked(void *dst, const void *src, size_t len, size_t *got)
{
    int saved = errno, rc = 0;
    size_t done = 0;
    while (done < len) {
        struct iovec to = {(char *)dst + done, len - done};
        struct iovec from = {(char *)src + done, len - done};
        ssize_t n = process_vm_readv(getpid(), &to, 1, &from, 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EFAULT)
            rc = errno;
        if (n <= 0)
            break;
        done += (size_t)n;
    }
    *got = done;
    errno = saved;
    return rc;
}

int _ta_os_thread_tid(void)
{
    return (int)syscall(SYS_gettid);
}

int _ta_os_lease_signal(void)
{
    return SIGURG;
}

void _ta_os_wait_signal(int sig)
{
    int saved = errno;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    while (sigwaitinfo(&set, NULL) < 0 && errno == EINTR)
        ;
    errno = saved;
}

_Static_assert(sizeof(pthread_key_t) == sizeof(ta_os_key_t), "os.h's key type");

int _ta_os_key_create(ta_os_key_t *key, void (*destructor)(void *))
{
    pthread_key_t k;
    int rc = pthread_key_create(&k, destructor);
    if (rc == 0)
        *key = (ta_os_key_t)k;
    return rc;
}

void _ta_os_key_set(ta_os_key_t key, const void *value)
{
    pthread_setspecific((pthread_key_t)key, value);
}

int _ta_os_at_fork(void (*prepare)(void), void (*parent)(void), void (*child)(void))
{
    return pthread_atfork(prepare, parent, child);
}

int _ta_os_pid(void)
{
    return (int)getpid();
}

void _ta_os_yield(void)
{
    sched_yield();
}

void _ta_os_sleep_ms(long ms)
{
    int saved = errno; /* EINTR: a signal cuts the sleep short, which is fine */
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    errno = saved;
}

void _ta_os_deadline(bool monotonic, uint64_t ms, struct timespec *out)
{
    clock_gettime(monotonic ? CLOCK_MONOTONIC : CLOCK_REALTIME, out);
    out->tv_sec += (time_t)(ms / 1000);
    out->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (out->tv_nsec >= 1000000000L) {
        out->tv_sec++;
        out->tv_nsec -= 1000000000L;
    }
}

bool _ta_os_environ_ready(void)
{
    return environ != NULL;
}

int _ta_os_cpu_count(void)
{
    int saved = errno;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    errno = saved;
    return n > 0 ? (int)n : 1;
}

