/* SPDX-License-Identifier: MIT */
/*
 * Memory pressure as the kernel tells it, without polling: PSI triggers on
 * the machine (/proc/pressure/memory) and on the process's cgroup v2 group
 * (memory.pressure), and for a cgroup v1 memory group the vmpressure level
 * and a usage threshold (eventfds through cgroup.event_control,
 * Documentation/admin-guide/cgroup-v1/memory.rst). One watcher a process,
 * owned by the purge thread; it sleeps in poll on these and on an eventfd
 * that wakes it for its other work. The cgroup's files are found from
 * /proc/self/cgroup and /proc/self/mountinfo. Nothing here allocates.
 */
#define _GNU_SOURCE
#include "faults.h"
#include "os.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* A stall of 150 ms in any 1 s window: the and the kernel
 * documentation's example; an unprivileged process may only ask for
 * windows of whole 2 s (kernel 6.5+), so that is the second try. */
static const char *const psi_triggers[] = {"some 150000 1000000", "some 300000 2000000"};

enum { SLOT_WAKE, SLOT_MACHINE, SLOT_CGROUP2, SLOT_LEVEL, SLOT_USAGE, SLOTS };
static const unsigned slot_source[SLOTS] = {TA_OS_PRESSURE_WAKE, TA_OS_PRESSURE_MACHINE,
                                            TA_OS_PRESSURE_CGROUP2, TA_OS_PRESSURE_CGROUP1,
                                            TA_OS_PRESSURE_CGROUP1};

static int fds[SLOTS] = {-1, -1, -1, -1, -1};
static char v1_dir[512], v2_dir[512]; /* the watched groups; "" where none */
static uint64_t usage_threshold;      /* v1: the threshold registered */
/* v1: usage (page cache included) is past the threshold, so the kernel
 * will not say when the memory in use crosses it: the wait looks every
 * USAGE_LOOK_MS until usage falls back under it. ws_above: the working
 * set was past it at the last look (an event is the crossing). */
#define USAGE_LOOK_MS 100
static bool usage_above, ws_above;

static long read_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    long total = -1;
    if (fd >= 0) {
        total = 0;
        ssize_t n;
        while ((size_t)total < cap - 1 && (n = read(fd, buf + total, cap - 1 - (size_t)total)) > 0)
            total += n;
        buf[total] = '\0';
        close(fd);
    }
    return total;
}

static uint64_t read_number(const char *path)
{
    char buf[64];
    if (read_file(path, buf, sizeof buf) <= 0 || buf[0] < '0' || buf[0] > '9')
        return 0; /* "max", or unreadable */
    uint64_t v = 0;
    for (const char *c = buf; *c >= '0' && *c <= '9' && v < (1ULL << 60); c++)
        v = v * 10 + (uint64_t)(*c - '0');
    return v >= (1ULL << 60) ? 0 : v; /* v1's "no limit" is near 2^63 */
}

/* The mount point of the cgroup hierarchy of type fstype ("cgroup2", or
 * "cgroup" with option opt) and its root, from /proc/self/mountinfo. */
static bool find_mount(const char *fstype, const char *opt, char *mnt, size_t mcap, char *root,
                       size_t rcap)
{
    char info[16384];
    if (read_file("/proc/self/mountinfo", info, sizeof info) <= 0)
        return false;
    for (char *line = info; line && *line;) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        /* "id parent maj:min root mountpoint opts ... - fstype source superopts" */
        char r[512], m[512], type[32], super[512];
        const char *dash = strstr(line, " - ");
        if (dash && sscanf(line, "%*d %*d %*s %511s %511s", r, m) == 2 &&
            sscanf(dash + 3, "%31s %*s %511s", type, super) == 2 && strcmp(type, fstype) == 0) {
            bool has = opt == NULL;
            for (char *o = super; !has && o;) {
                char *comma = strchr(o, ',');
                size_t len = comma ? (size_t)(comma - o) : strlen(o);
                has = len == strlen(opt) && strncmp(o, opt, len) == 0;
                o = comma ? comma + 1 : NULL;
            }
            if (has) {
                snprintf(mnt, mcap, "%s", m);
                snprintf(root, rcap, "%s", r);
                return true;
            }
        }
        line = next;
    }
    return false;
}

/* The directories of the process's own groups (not the root group's: the
 * machine's PSI covers that), into v1 and v2 (GROUP_DIR bytes each). */
#define GROUP_DIR 512
static void find_groups(char *v1, char *v2)
{
    char groups[4096], mnt[512], root[512];
    v1[0] = v2[0] = '\0';
    if (read_file("/proc/self/cgroup", groups, sizeof groups) <= 0)
        return;
    for (char *line = groups; line && *line;) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        /* "hierarchy-id:controllers:path" */
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        /* "/" too: in a cgroup namespace it is the container's own group
         * (on the host the root's limit reads as none, and its files as
         * the machine's). */
        if (c2) {
            const char *path = c2 + 1;
            bool is_v2 = strncmp(line, "0::", 3) == 0;
            bool memory = false;
            for (char *o = c1 + 1; !is_v2 && o < c2;) {
                char *comma = memchr(o, ',', (size_t)(c2 - o));
                size_t len = comma ? (size_t)(comma - o) : (size_t)(c2 - o);
                memory |= len == 6 && strncmp(o, "memory", 6) == 0;
                o = comma ? comma + 1 : c2;
            }
            char *dir = is_v2 ? v2 : memory ? v1 : NULL;
            if (dir && find_mount(is_v2 ? "cgroup2" : "cgroup", is_v2 ? NULL : "memory", mnt,
                                  sizeof mnt, root, sizeof root)) {
                size_t rl = strlen(root);
                if (rl > 1 && strncmp(path, root, rl) == 0) /* the mount shows a subtree */
                    path += rl;
                snprintf(dir, GROUP_DIR, "%s%s", mnt, path);
            }
        }
        line = next;
    }
}

static int open_psi(const char *path)
{
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return -1;
    for (size_t i = 0; i < sizeof psi_triggers / sizeof psi_triggers[0]; i++)
        if (write(fd, psi_triggers[i], strlen(psi_triggers[i]) + 1) > 0)
            return fd;
    close(fd);
    return -1;
}

/* v1: an eventfd told of file's events (args after the two fds). */
static int open_v1_event(const char *file, const char *args)
{
    char path[600], line[96];
    snprintf(path, sizeof path, "%s/%s", v1_dir, file);
    int target = open(path, O_RDONLY | O_CLOEXEC);
    if (target < 0)
        return -1;
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    snprintf(path, sizeof path, "%s/cgroup.event_control", v1_dir);
    int ctl = efd >= 0 ? open(path, O_WRONLY | O_CLOEXEC) : -1;
    int n = snprintf(line, sizeof line, "%d %d %s", efd, target, args);
    bool ok = ctl >= 0 && write(ctl, line, (size_t)n) == n;
    if (ctl >= 0)
        close(ctl);
    close(target); /* the registration holds its own reference */
    if (!ok && efd >= 0) {
        close(efd);
        efd = -1;
    }
    return efd;
}

static uint64_t v1_limit(const char *dir);

/* A usage threshold an eighth below the v1 group's limit (none without
 * one): a warning that comes with the charge itself, before reclaim has
 * to fail. Registered again when the limit changes. */
static uint64_t watched_limit, limit_look_ms;
#define LIMIT_LOOK_MS 1000

static void watch_usage(uint64_t limit)
{
    if (fds[SLOT_USAGE] >= 0)
        close(fds[SLOT_USAGE]);
    fds[SLOT_USAGE] = -1;
    usage_above = ws_above = false;
    watched_limit = limit;
    limit_look_ms = _ta_os_now_ms();
    if (limit == 0)
        return;
    char arg[32];
    usage_threshold = limit - limit / 8;
    snprintf(arg, sizeof arg, "%llu", (unsigned long long)usage_threshold);
    fds[SLOT_USAGE] = open_v1_event("memory.usage_in_bytes", arg);
    /* already past it: no crossing will come until usage falls */
    usage_above = fds[SLOT_USAGE] >= 0 && _ta_os_cgroup_usage() >= usage_threshold;
}

/* A field of a v1 group's memory.stat, 0 where absent. */
static uint64_t v1_stat(const char *dir, const char *field)
{
    char path[600], stat[8192];
    snprintf(path, sizeof path, "%s/memory.stat", dir);
    if (dir[0] == '\0' || read_file(path, stat, sizeof stat) <= 0)
        return 0;
    size_t fl = strlen(field);
    for (const char *at = stat; (at = strstr(at, field)) != NULL; at += fl) {
        unsigned long long v = 0;
        if ((at == stat || at[-1] == '\n') && at[fl] == ' ' && sscanf(at + fl + 1, "%llu", &v) == 1)
            return v >= (1ULL << 60) ? 0 : v; /* v1's "no limit" is near 2^63 */
    }
    return 0;
}

/* The smallest limit of a v1 group and its parents (use_hierarchy). */
static uint64_t v1_limit(const char *dir)
{
    return v1_stat(dir, "hierarchical_memory_limit");
}

uint64_t _ta_os_cgroup_v1_limit(void)
{
    int saved = errno;
    uint64_t v = v1_limit(v1_dir);
    errno = saved;
    return v;
}

size_t _ta_os_cgroup_memory_limit(void)
{
    int saved = errno;
    char v1[GROUP_DIR], v2[GROUP_DIR], path[600];
    find_groups(v1, v2);
    uint64_t limit = 0;
    if (v2[0]) { /* the group's own memory.max ("max": none) */
        snprintf(path, sizeof path, "%s/memory.max", v2);
        limit = read_number(path);
    }
    if (limit == 0 && v1[0])
        limit = v1_limit(v1);
    errno = saved;
    return (size_t)limit;
}

unsigned _ta_os_pressure_open(bool listen)
{
    int saved = errno;
    unsigned sources = 0;
    _ta_os_pressure_close();
    usage_above = ws_above = false;
    v1_dir[0] = v2_dir[0] = '\0';
    fds[SLOT_WAKE] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fds[SLOT_WAKE] < 0 || !listen) {
        errno = saved;
        return 0;
    }
    find_groups(v1_dir, v2_dir);
    char path[600];
    fds[SLOT_MACHINE] = open_psi("/proc/pressure/memory");
    if (v2_dir[0]) {
        snprintf(path, sizeof path, "%s/memory.pressure", v2_dir);
        fds[SLOT_CGROUP2] = open_psi(path);
    }
    if (v1_dir[0]) {
        fds[SLOT_LEVEL] = open_v1_event("memory.pressure_level", "medium");
        watch_usage(v1_limit(v1_dir));
    }
    for (int i = SLOT_MACHINE; i < SLOTS; i++)
        if (fds[i] >= 0)
            sources |= slot_source[i];
    errno = saved;
    return sources;
}

void _ta_os_pressure_close(void)
{
    int saved = errno;
    for (int i = 0; i < SLOTS; i++) {
        if (fds[i] >= 0)
            close(fds[i]);
        fds[i] = -1;
    }
    errno = saved;
}

void _ta_os_pressure_forget(void)
{
    for (int i = 0; i < SLOTS; i++)
        fds[i] = -1;
}

bool _ta_os_pressure_wakeable(void)
{
    return fds[SLOT_WAKE] >= 0;
}

void _ta_os_pressure_wake(void)
{
    int saved = errno;
    uint64_t one = 1;
    if (fds[SLOT_WAKE] >= 0 && write(fds[SLOT_WAKE], &one, sizeof one) < 0) {
        /* EAGAIN: the counter is full, so a wake is pending anyway */
    }
    errno = saved;
}

unsigned _ta_os_pressure_wait(long timeout_ms)
{
    int saved = errno;
    struct pollfd p[SLOTS];
    int slot[SLOTS], n = 0;
    for (int i = 0; i < SLOTS; i++) {
        if (fds[i] < 0)
            continue;
        /* PSI triggers signal POLLPRI; eventfds are readable. */
        p[n] = (struct pollfd){.fd = fds[i],
                               .events = i == SLOT_MACHINE || i == SLOT_CGROUP2 ? POLLPRI : POLLIN};
        slot[n++] = i;
    }
    unsigned fired = 0;
    if (usage_above && fds[SLOT_USAGE] >= 0 && (timeout_ms < 0 || timeout_ms > USAGE_LOOK_MS))
        timeout_ms = USAGE_LOOK_MS;
    if (n > 0 && poll(p, (nfds_t)n, timeout_ms < 0 ? -1 : (int)timeout_ms) > 0) {
        for (int k = 0; k < n; k++) {
            int i = slot[k];
            if (p[k].revents & (POLLERR | POLLNVAL)) { /* the group went away */
                if (i != SLOT_WAKE) {
                    close(fds[i]);
                    fds[i] = -1;
                }
                continue;
            }
            if (!(p[k].revents & (POLLPRI | POLLIN)))
                continue;
            if (i != SLOT_MACHINE && i != SLOT_CGROUP2) {
                uint64_t count;
                if (read(fds[i], &count, sizeof count) != sizeof count)
                    continue;
            }
            if (i == SLOT_USAGE) { /* crossed, one way or the other: looked at below */
                usage_above = true;
                continue;
            }
            fired |= slot_source[i];
        }
    } else if (n == 0 && timeout_ms > 0) {
        _ta_os_sleep_ms(timeout_ms);
    }
    /* Only memory in use crossing the threshold upwards is pressure: the
     * page cache's files go first and cheaply. */
    /* A limit changed at run time moves the threshold, seen at the first
     * wake-up a second or more after the last look (no wake-up of its own). */
    if (v1_dir[0] && fds[SLOT_WAKE] >= 0 && _ta_os_now_ms() - limit_look_ms >= LIMIT_LOOK_MS) {
        uint64_t limit = v1_limit(v1_dir);
        limit_look_ms = _ta_os_now_ms();
        if (limit != watched_limit)
            watch_usage(limit);
    }
    if (usage_above && fds[SLOT_USAGE] >= 0) {
        /* a margin under it: the kernel checks thresholds only every 128
         * page events, so a look may see usage a little lower than it did */
        usage_above = _ta_os_cgroup_usage() + (usage_threshold >> 6) >= usage_threshold;
        bool above = usage_above && _ta_os_cgroup_working_set() >= usage_threshold;
        if (above && !ws_above)
            fired |= TA_OS_PRESSURE_CGROUP1;
        ws_above = above;
    }
    errno = saved;
    return fired;
}

uint64_t _ta_os_cgroup_usage(void)
{
    int saved = errno;
    char path[600];
    uint64_t v = 0;
    if (v1_dir[0]) {
        snprintf(path, sizeof path, "%s/memory.usage_in_bytes", v1_dir);
        v = read_number(path);
    } else if (v2_dir[0]) {
        snprintf(path, sizeof path, "%s/memory.current", v2_dir);
        v = read_number(path);
    }
    errno = saved;
    return v;
}

uint64_t _ta_os_cgroup_working_set(void)
{
    int saved = errno;
    uint64_t usage = _ta_os_cgroup_usage();
    /* All file pages, active ones too: a file read again after reclaim
     * comes back active (refault), and is still the kernel's to drop
     * (thrashing shows in PSI instead). */
    uint64_t files =
        v1_dir[0] ? v1_stat(v1_dir, "total_inactive_file") + v1_stat(v1_dir, "total_active_file")
                  : 0;
    errno = saved;
    return usage > files ? usage - files : 0;
}

/* "some avg10=1.23" of a PSI file, into out. */
static int psi_some(const char *path, char *out, size_t len)
{
    char buf[256];
    if (read_file(path, buf, sizeof buf) <= 0 || strncmp(buf, "some ", 5) != 0)
        return snprintf(out, len, "unreadable");
    size_t n = strcspn(buf + 5, " \n");
    return snprintf(out, len, "%.*s", (int)(n < 40 ? n : 40), buf + 5);
}

int _ta_os_pressure_figure(char *out, size_t len)
{
    int saved = errno;
    char path[600], part[64];
    size_t at = 0;
    psi_some("/proc/pressure/memory", part, sizeof part);
    at += (size_t)snprintf(out, len, "machine %s", part);
    if (v2_dir[0] && at < len) {
        snprintf(path, sizeof path, "%s/memory.pressure", v2_dir);
        psi_some(path, part, sizeof part);
        at += (size_t)snprintf(out + at, len - at, ", cgroup %s", part);
    }
    if (v1_dir[0] && at < len) {
        uint64_t limit = _ta_os_cgroup_v1_limit();
        at += (size_t)snprintf(out + at, len - at, ", cgroup in use %llu MiB",
                               (unsigned long long)(_ta_os_cgroup_working_set() >> 20));
        if (limit && at < len)
            at += (size_t)snprintf(out + at, len - at, " of %llu MiB",
                                   (unsigned long long)(limit >> 20));
    }
    errno = saved;
    return (int)(at < len ? at : len - 1);
}
