/* SPDX-License-Identifier: MIT */
/*
 * Memory pressure in a real memory cgroup (v1; as root): processes that
 * would be OOM-killed without tensoralloc's response, and finish with it.
 * `pressure` (or `pressure test`) runs the cases below as a TAP test (the
 * pressure-cgroup test); `pressure bench [reps] [limit_mib]` is the
 * benchmark: a model cache at half the group's limit while a second
 * process in the group grows to 0.6 of it, for glibc with a fixed-budget
 * cache (malloc, pread, an LRU by hand), tensoralloc's cache ignoring
 * pressure, and giving way; interleaved, medians (docs/benchmarks.md
 * "Memory pressure").
 *
 *   pool:  a process keeps 160 MiB of freed blocks in the retain pool
 *          (RETAIN_MS ten minutes), then maps and touches 160 MiB more in a
 *          256 MiB group. Without pressure handling the kernel kills it;
 *          with it the pool goes back when the group's memory in use
 *          passes 7/8 of the limit, and it finishes.
 *   cache: a model cache with a 320 MiB budget switches between eight
 *          40 MiB models (one locked all along) in a 400 MiB group, and a
 *          second process in the group then takes 200 MiB. Without
 *          pressure handling the cache's process is OOM-killed; with it,
 *          it evicts, finishes, and the locked model is whole.
 *   rule:  a cache with ram_budget 0 in a 6 GiB group has the rule's 3 GiB;
 *          the limit lowered to 4 GiB, it has 2 GiB.
 *
 * TAP output; every case skips with the reason where there is no cgroup
 * v1 memory controller or the program is not root. The roles run as
 * this program again (argv[1]), exec'd after joining the group.
 */
#define _GNU_SOURCE
#include "tensoralloc.h"
#include "tensoralloc_cache.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MiB ((size_t)1 << 20)
#define V1_ROOT "/sys/fs/cgroup/memory"
#define MODELS 8

/* The cache scenario's sizes (MiB) and length: the test's, or the
 * benchmark's from its limit. rounds 0: switch until 5 s after the cache
 * is full. */
typedef struct {
    size_t limit, model, budget, grow;
    int rounds;
} scenario_t;

static int case_no;

static void tap(bool ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", ok ? "ok" : "not ok", ++case_no);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    ssize_t n = write(fd, text, strlen(text));
    int rc = n == (ssize_t)strlen(text) ? 0 : errno;
    close(fd);
    return rc;
}

static uint64_t read_field(const char *path, const char *field)
{
    char buf[4096];
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *at = strstr(buf, field);
    return at ? strtoull(at + strlen(field), NULL, 10) : 0;
}

/* ---- the roles ---------------------------------------------------------- */

static ta_stats_t stats_now(void)
{
    ta_stats_t st = {.size = sizeof st};
    ta_stats_get(&st);
    return st;
}

/* Touches mib MiB of fresh anonymous memory, 1 MiB a step, a second
 * process growing. */
static char *grow(size_t mib, useconds_t pause_us)
{
    char *raw = mmap(NULL, mib * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        exit(4);
    for (size_t i = 0; i < mib; i++) {
        memset(raw + i * MiB, (int)i, MiB);
        usleep(pause_us);
    }
    return raw;
}

/* Under LD_PRELOAD (TA_PRELOADED set) through malloc and free, as any
 * program: the preload library's ta_stats_get comes first too. */
static int role_pool(bool pressure)
{
    enum { BLOCKS = 20 };
    bool preloaded = getenv("TA_PRELOADED") != NULL;
    void *b[BLOCKS];
    free(malloc(1)); /* the first allocation starts the purge thread */
    ta_free(ta_malloc(1));
    for (int i = 0; i < 200 && pressure && !(stats_now().pressure_sources & TA_PRESSURE_CGROUP1);
         i++)
        usleep(10000);
    if (pressure && !(stats_now().pressure_sources & TA_PRESSURE_CGROUP1))
        return 6;
    if (getenv("TA_POOL_WAIT"))
        usleep(2000000); /* the parent lowers the group's limit meanwhile */
    for (int i = 0; i < BLOCKS; i++) {
        if ((b[i] = preloaded ? malloc(8 * MiB) : ta_malloc(8 * MiB)) == NULL)
            return 4;
        memset(b[i], i, 8 * MiB);
    }
    for (int i = 0; i < BLOCKS; i++) {
        if (preloaded)
            free(b[i]);
        else
            ta_free(b[i]);
    }
    if (stats_now().pool_bytes < 150 * MiB)
        return 5; /* the pool must hold them for the case to mean anything */
    grow(160, 500);
    ta_stats_t st = stats_now();
    fprintf(stderr,
            "pool role: %" PRIu64 " events, %" PRIu64 " MiB given back, pool %" PRIu64 " MiB\n",
            st.pressure_events, st.pressure_released_bytes >> 20, st.pool_bytes >> 20);
    return pressure && (st.pressure_events == 0 || st.pressure_released_bytes < 100 * MiB) ? 3 : 0;
}

static unsigned char model_byte(int model, size_t i)
{
    return (unsigned char)(i * 7 + (size_t)model * 31 + (i >> 12));
}

static void log_stderr(void *arg, ta_log_level_t level, const char *message)
{
    (void)arg;
    if (level <= TA_LOG_WARN || strstr(message, "memory pressure") != NULL)
        fprintf(stderr, "cache: %s\n", message);
}

/* The plain program a server would be without the cache: malloc and
 * pread under a fixed budget, least recently used evicted first (glibc's
 * malloc: this program is not preloaded). */
static int role_plain(const char *dir, int full_fd, const scenario_t *sc)
{
    void *data[MODELS] = {0};
    uint64_t used_at[MODELS] = {0}, tick = 0;
    size_t held = 0, size = sc->model * MiB;
    for (int round = 0; round < sc->rounds; round++) {
        for (int m = round == 0 ? 0 : 1; m < MODELS; m++) {
            used_at[m] = ++tick;
            if (data[m])
                continue;
            while (held + size > sc->budget * MiB) { /* model 0 is locked: never evicted */
                int lru = -1;
                for (int k = 1; k < MODELS; k++)
                    if (data[k] && (lru < 0 || used_at[k] < used_at[lru]))
                        lru = k;
                if (lru < 0)
                    return 7;
                free(data[lru]);
                data[lru] = NULL;
                held -= size;
            }
            char path[512];
            snprintf(path, sizeof path, "%s/m%d.bin", dir, m);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0 || (data[m] = malloc(size)) == NULL)
                return 4;
            for (size_t off = 0; off < size;) {
                ssize_t n = pread(fd, (char *)data[m] + off, size - off, (off_t)off);
                if (n <= 0)
                    return 4;
                off += (size_t)n;
            }
            close(fd);
            held += size;
            usleep(10000);
        }
        if (round == 0 && write(full_fd, "F", 1) != 1)
            return 4;
    }
    return 0;
}

static int role_cache(const char *dir, int full_fd, bool pressure, const scenario_t *sc)
{
    ta_cache_config_t cfg = {
        .size = sizeof cfg,
        .ram_budget = sc->budget * MiB,
        .log = log_stderr,
        .log_level = TA_LOG_INFO,
        .load_threads = 2,
        .pressure = pressure ? TA_CACHE_PRESSURE_GIVE_WAY : TA_CACHE_PRESSURE_IGNORE,
        .pressure_floor = 2 * sc->model * MiB, /* the locked model and one more */
    };
    ta_cache_t *c;
    if (ta_cache_create(&cfg, &c))
        return 4;
    char path[512], key[16];
    int64_t shape[1] = {(int64_t)(sc->model * MiB)};
    ta_entry_t *locked = NULL;
    uint64_t full_at = 0;
    int switches = 0;
    for (int round = 0; sc->rounds ? round < sc->rounds : full_at == 0 || now_ms() - full_at < 5000;
         round++) {
        for (int m = round == 0 ? 0 : 1; m < MODELS; m++) {
            ta_entry_t *e;
            snprintf(key, sizeof key, "m%d", m);
            snprintf(path, sizeof path, "%s/m%d.bin", dir, m);
            int rc = ta_cache_get(c, key, &e);
            if (rc == ENOENT)
                rc = ta_cache_load_raw(c, key, path, TA_DTYPE_U8, 1, shape, &e);
            if (rc) {
                const char *why;
                ta_cache_last_error(&why);
                fprintf(stderr, "cache role: %s: %s (%s)\n", key, ta_strerror(rc), why);
                return 7;
            }
            switches++;
            if (m == 0)
                locked = e; /* held to the end: pressure must not touch it */
            else
                ta_entry_unlock(e);
            usleep(sc->rounds ? 10000 : 20000);
        }
        if (round == 0) {
            full_at = now_ms();
            if (write(full_fd, "F", 1) != 1)
                return 4;
        }
    }
    ta_tensor_t t;
    ta_entry_tensor(locked, "data", &t);
    const unsigned char *d = t.data;
    for (size_t i = 0; i < sc->model * MiB; i++)
        if (d[i] != model_byte(0, i))
            return 8;
    ta_entry_unlock(locked);
    ta_cache_stats_t st = {.size = sizeof st};
    ta_cache_stats_get(c, &st);
    fprintf(stderr,
            "cache role: %d switches, %" PRIu64 " pressure events, %" PRIu64
            " MiB evicted on pressure, budget now %" PRIu64 " MiB\n",
            switches, st.pressure_events, st.pressure_evicted_bytes >> 20, st.budget_now >> 20);
    ta_cache_destroy(c);
    /* the test's scenario must have been met with pressure */
    return pressure && sc->rounds == 0 &&
                   (st.pressure_events == 0 || st.pressure_evicted_bytes == 0)
               ? 3
               : 0;
}

/* A cache with ram_budget 0 reports the rule's budget for its group's
 * limit, then again after the parent lowered the limit (the rule is looked
 * at again at most once a second). */
static int role_rule(int fd)
{
    ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = 0};
    ta_cache_t *c;
    if (ta_cache_create(&cfg, &c))
        return 4;
    ta_cache_stats_t st = {.size = sizeof st};
    ta_cache_stats_get(c, &st);
    uint64_t first = st.ram_budget;
    if (write(fd, &first, sizeof first) != sizeof first)
        return 4;
    /* the parent lowers the limit now: the budget follows within 5 s */
    for (int i = 0; i < 50 && st.ram_budget == first; i++) {
        usleep(100000);
        ta_cache_stats_get(c, &st);
    }
    if (write(fd, &st.ram_budget, sizeof st.ram_budget) != sizeof st.ram_budget)
        return 4;
    ta_cache_destroy(c);
    return 0;
}

/* ---- the cases ---------------------------------------------------------- */

/* Forks a child into the group and execs this program with args. */
static pid_t spawn(const char *group, char *const args[], const char *pressure, int keep_fd,
                   const scenario_t *sc)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;                   /* -1: the callers' waits fail, and their cases with them */
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* a test killed on its timeout leaves no child */
    char path[512], me[32];
    snprintf(path, sizeof path, "%s/cgroup.procs", group);
    snprintf(me, sizeof me, "%d", getpid());
    if (write_file(path, me) != 0)
        _exit(9);
    setenv("TENSORALLOC_PRESSURE", pressure, 1);
    setenv("TENSORALLOC_PURGE_THREAD", "1", 1);
    setenv("TENSORALLOC_RETAIN_MS", "600000", 1);
    setenv("TENSORALLOC_RETAIN_BYTES", "1G", 1);
    if (sc) {
        char v[96];
        snprintf(v, sizeof v, "%zu %zu %zu %zu %d", sc->limit, sc->model, sc->budget, sc->grow,
                 sc->rounds);
        setenv("TA_PRESSURE_SCENARIO", v, 1);
    }
    if (keep_fd >= 0)
        fcntl(keep_fd, F_SETFD, 0);
    execv("/proc/self/exe", args);
    _exit(10);
}

static bool make_group(char *group, size_t len, const char *name, size_t limit_mib)
{
    char path[600], value[32];
    snprintf(group, len, V1_ROOT "/ta-pressure-%d-%s", getpid(), name);
    if (mkdir(group, 0755) != 0 && errno != EEXIST)
        return false;
    snprintf(path, sizeof path, "%s/memory.limit_in_bytes", group);
    snprintf(value, sizeof value, "%zu", limit_mib * MiB);
    int rc = write_file(path, value);
    if (rc != 0) {
        rmdir(group);
        errno = rc;
    }
    return rc == 0;
}

static uint64_t oom_kills(const char *group)
{
    char path[600];
    snprintf(path, sizeof path, "%s/memory.oom_control", group);
    return read_field(path, "oom_kill ");
}

static const char *how_ended(int status, char *buf, size_t len)
{
    if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d", WTERMSIG(status));
    else
        snprintf(buf, len, "exit %d", WEXITSTATUS(status));
    return buf;
}

/* lowered: the group starts at 1 GiB and is lowered to 256 MiB after the
 * watch began (its usage threshold must follow). */
static void case_pool(bool pressure, bool lowered)
{
    char group[512], how[64], path[600];
    if (!make_group(group, sizeof group, pressure ? "pool-on" : "pool-off", lowered ? 1024 : 256)) {
        tap(false, "pool: cannot make a group: %s", strerror(errno));
        return;
    }
    char *args[] = {"pressure", "pool", NULL};
    int status;
    /* As a program that only preloads tensoralloc, where the test knows
     * the preload library (TA_PRELOAD, from meson). */
    const char *preload = getenv("TA_PRELOAD");
    if (preload) {
        setenv("LD_PRELOAD", preload, 1);
        setenv("TA_PRELOADED", "1", 1);
    }
    if (lowered)
        setenv("TA_POOL_WAIT", "1", 1);
    pid_t pid = spawn(group, args, pressure ? "1" : "0", -1, NULL);
    unsetenv("LD_PRELOAD");
    unsetenv("TA_PRELOADED");
    unsetenv("TA_POOL_WAIT");
    bool limited = true;
    if (lowered) {
        usleep(700000);
        snprintf(path, sizeof path, "%s/memory.limit_in_bytes", group);
        limited = write_file(path, "268435456") == 0;
    }
    waitpid(pid, &status, 0);
    uint64_t kills = oom_kills(group);
    if (pressure)
        tap(limited && WIFEXITED(status) && WEXITSTATUS(status) == 0 && kills == 0,
            "pool%s, pressure handled%s: the pool goes back and the process finishes (%s, %" PRIu64
            " OOM kills)",
            preload ? " (preloaded)" : "",
            lowered ? ", the limit lowered after the watch began" : "",
            how_ended(status, how, sizeof how), kills);
    else
        tap(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && kills > 0,
            "pool%s, pressure not handled: the process is OOM-killed (%s, %" PRIu64 " OOM kills)",
            preload ? " (preloaded)" : "", how_ended(status, how, sizeof how), kills);
    rmdir(group);
}

static bool make_models(const char *dir, size_t model_mib)
{
    unsigned char *buf = malloc(model_mib * MiB);
    if (!buf)
        return false;
    for (int m = 0; m < MODELS; m++) {
        char path[512];
        snprintf(path, sizeof path, "%s/m%d.bin", dir, m);
        for (size_t i = 0; i < model_mib * MiB; i++)
            buf[i] = model_byte(m, i);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(buf, 1, model_mib * MiB, f) != model_mib * MiB || fclose(f) != 0) {
            free(buf);
            return false;
        }
    }
    free(buf);
    return true;
}

/* One run of the cache scenario in a fresh group: how the cache's
 * process (A) and the second one (B) ended, A's time and peak RSS. */
typedef struct {
    bool full; /* A filled its budget and B ran */
    int status_a, status_b;
    uint64_t oom_kills;
    double seconds;      /* A's wall time */
    double peak_rss_mib; /* A's */
} run_t;

/* mode: "plain", "cache"; pressure: TENSORALLOC_PRESSURE and the cache's
 * policy; grow: whether B runs at all. */
static run_t run_scenario(const char *dir, const char *mode, bool pressure, bool grow,
                          const scenario_t *sc, const char *name, const char *preload)
{
    run_t r = {0};
    char group[512];
    if (!make_group(group, sizeof group, name, sc->limit)) {
        r.status_a = -1;
        return r;
    }
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        r.status_a = -1;
        rmdir(group);
        return r;
    }
    char fd_arg[16];
    snprintf(fd_arg, sizeof fd_arg, "%d", fds[1]);
    char *args_a[] = {"pressure", (char *)mode, (char *)dir, fd_arg, NULL};
    uint64_t start = now_ms();
    if (preload) /* the plain program under another allocator */
        setenv("LD_PRELOAD", preload, 1);
    pid_t a = spawn(group, args_a, pressure ? "1" : "0", fds[1], sc);
    unsetenv("LD_PRELOAD");
    close(fds[1]);
    char full = 0;
    r.full = read(fds[0], &full, 1) == 1; /* the cache holds its whole budget */
    close(fds[0]);
    pid_t b = -1;
    if (r.full && grow) {
        char *args_b[] = {"pressure", "grow", NULL};
        b = spawn(group, args_b, "0", -1, sc);
    }
    struct rusage ru;
    wait4(a, &r.status_a, 0, &ru);
    r.seconds = (double)(now_ms() - start) / 1000.0;
    if (b > 0)
        waitpid(b, &r.status_b, 0);
    r.peak_rss_mib = (double)ru.ru_maxrss / 1024.0;
    r.oom_kills = oom_kills(group);
    rmdir(group);
    return r;
}

static void case_cache(const char *dir, bool pressure)
{
    const scenario_t sc = {.limit = 400, .model = 40, .budget = 320, .grow = 200};
    char how[64], how_b[64];
    run_t r =
        run_scenario(dir, "cache", pressure, true, &sc, pressure ? "cache-on" : "cache-off", NULL);
    if (r.status_a == -1) {
        tap(false, "cache: cannot make a 400 MiB group: %s", strerror(errno));
        return;
    }
    how_ended(r.status_b, how_b, sizeof how_b);
    if (pressure)
        tap(r.full && WIFEXITED(r.status_a) && WEXITSTATUS(r.status_a) == 0 && r.oom_kills == 0 &&
                WIFEXITED(r.status_b) && WEXITSTATUS(r.status_b) == 0,
            "cache, pressure handled: it evicts, finishes, the locked model is whole (cache %s, "
            "second process %s, %" PRIu64 " OOM kills)",
            how_ended(r.status_a, how, sizeof how), how_b, r.oom_kills);
    else
        tap(r.full && WIFSIGNALED(r.status_a) && WTERMSIG(r.status_a) == SIGKILL && r.oom_kills > 0,
            "cache, pressure not handled: the cache's process is OOM-killed (cache %s, second "
            "process %s, %" PRIu64 " OOM kills)",
            how_ended(r.status_a, how, sizeof how), how_b, r.oom_kills);
}

static void case_rule(void)
{
    char group[512], path[600];
    if ((uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE) < ((uint64_t)6 << 30)) {
        printf("ok %d # SKIP the rule case needs 6 GiB of memory, for a 6 GiB limit to decide\n",
               ++case_no);
        return;
    }
    if (!make_group(group, sizeof group, "rule", 6144)) {
        tap(false, "rule: cannot make a 6 GiB group: %s", strerror(errno));
        return;
    }
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        tap(false, "rule: pipe: %s", strerror(errno));
        rmdir(group);
        return;
    }
    char fd_arg[16];
    snprintf(fd_arg, sizeof fd_arg, "%d", fds[1]);
    char *args[] = {"pressure", "rule", fd_arg, NULL};
    pid_t pid = spawn(group, args, "1", fds[1], NULL);
    close(fds[1]);
    uint64_t before = 0, after = 0;
    bool got = read(fds[0], &before, sizeof before) == sizeof before;
    snprintf(path, sizeof path, "%s/memory.limit_in_bytes", group);
    got = got && write_file(path, "4294967296") == 0;
    got = got && read(fds[0], &after, sizeof after) == sizeof after;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    tap(got && before == ((uint64_t)3 << 30) && after == ((uint64_t)2 << 30),
        "ram_budget 0 follows the group's limit: %" PRIu64 " MiB under 6 GiB, then %" PRIu64
        " MiB under 4 GiB (the rule: 3072, then 2048)",
        before >> 20, after >> 20);
    rmdir(group);
}

static const char *skip_reason(void)
{
    if (geteuid() != 0)
        return "not root: making a memory cgroup needs root";
    if (access(V1_ROOT "/memory.limit_in_bytes", F_OK) != 0)
        return "no cgroup v1 memory controller at " V1_ROOT " (the cgroup v2 case is not written)";
    return NULL;
}

static void remove_models(const char *dir)
{
    for (int m = 0; m < MODELS; m++) {
        char path[512];
        snprintf(path, sizeof path, "%s/m%d.bin", dir, m);
        unlink(path);
    }
    rmdir(dir);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The benchmark: each configuration reps times, interleaved (in turn, then
 * backwards), with and without the second process. */
static int bench(int reps, size_t limit)
{
    if (reps < 1 || reps > 64 || limit < 200 || limit > ((size_t)1 << 20)) {
        fprintf(stderr,
                "pressure bench: repetitions 1-64 and a limit of 200 MiB to 1 TiB, not "
                "%d and %zu\n",
                reps, limit);
        return 2;
    }
    const char *why = skip_reason();
    if (why) {
        fprintf(stderr, "pressure bench: %s\n", why);
        return 77;
    }
    const scenario_t sc = {.limit = limit,
                           .model = limit / 10,
                           .budget = limit / 2,
                           .grow = limit * 6 / 10,
                           .rounds = 40};
    /* The peers run the plain program too, with the second process only:
     * a fixed budget is a fixed budget whoever allocates it (their runs
     * without it would take glibc's minute and a half each). */
    static const struct {
        const char *name, *mode;
        bool pressure;
        const char *preload;
    } configs[] = {
        {"glibc, fixed budget", "plain", false, NULL},
        {"jemalloc, fixed budget", "plain", false, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
        {"mimalloc, fixed budget", "plain", false, "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2"},
        {"tcmalloc, fixed budget", "plain", false,
         "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
        {"tensoralloc, pressure ignored", "cache", false, NULL},
        {"tensoralloc, giving way", "cache", true, NULL}};
    enum { CONFIGS = 6 };
    char dir[] = "/tmp/ta-pressure-bench-XXXXXX";
    if (!mkdtemp(dir) || !make_models(dir, sc.model)) {
        fprintf(stderr, "pressure bench: cannot write the model files in /tmp\n");
        return 1;
    }
    printf("Group limit %zu MiB; 8 models of %zu MiB, one locked; budget %zu MiB; the second "
           "process takes %zu MiB; %d rounds of switches, 10 ms apart; %d repetitions, "
           "interleaved; medians (min-max).\n\n",
           sc.limit, sc.model, sc.budget, sc.grow, sc.rounds, reps);
    printf("| configuration | second process | runs without an OOM kill | OOM kills (either "
           "process) | time s "
           "| peak RSS MiB |\n");
    printf("| --- | --- | --- | --- | --- | --- |\n");
    for (int grow = 1; grow >= 0; grow--) {
        double secs[CONFIGS][64], rss[CONFIGS][64];
        int kills[CONFIGS] = {0}, done[CONFIGS] = {0};
        for (int rep = 0; rep < reps && rep < 64; rep++) {
            for (int k = 0; k < CONFIGS; k++) {
                int c = rep % 2 ? CONFIGS - 1 - k : k;
                const char *pre = configs[c].preload;
                if (pre && (!grow || access(pre, R_OK) != 0))
                    continue;
                run_t r = run_scenario(dir, configs[c].mode, configs[c].pressure, grow, &sc,
                                       "bench", pre);
                kills[c] += (int)r.oom_kills;
                if (r.oom_kills == 0 && WIFEXITED(r.status_a) && WEXITSTATUS(r.status_a) == 0) {
                    secs[c][done[c]] = r.seconds;
                    rss[c][done[c]++] = r.peak_rss_mib;
                } else {
                    char a[64], b[64];
                    fprintf(stderr,
                            "%s, %s: cache process %s, second process %s, %" PRIu64 " OOM kills\n",
                            configs[c].name, grow ? "grows" : "none",
                            how_ended(r.status_a, a, sizeof a), how_ended(r.status_b, b, sizeof b),
                            r.oom_kills);
                }
            }
        }
        for (int c = 0; c < CONFIGS; c++) {
            const char *pre = configs[c].preload;
            if (pre && (!grow || access(pre, R_OK) != 0)) {
                if (grow)
                    printf("| %s | grows | not installed | | | |\n", configs[c].name);
                continue;
            }
            printf("| %s | %s | %d of %d | %d |", configs[c].name, grow ? "grows" : "none", done[c],
                   reps, kills[c]);
            if (done[c] == 0) {
                printf(" - | - |\n");
                continue;
            }
            qsort(secs[c], (size_t)done[c], sizeof(double), cmp_double);
            qsort(rss[c], (size_t)done[c], sizeof(double), cmp_double);
            int n = done[c];
            printf(" %.2f (%.2f-%.2f) | %.0f (%.0f-%.0f) |\n", secs[c][n / 2], secs[c][0],
                   secs[c][n - 1], rss[c][n / 2], rss[c][0], rss[c][n - 1]);
        }
    }
    remove_models(dir);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "bench") == 0)
        return bench(argc > 2 ? atoi(argv[2]) : 3,
                     argc > 3 ? (size_t)strtoull(argv[3], NULL, 10) : 1000);
    if (argc > 1 && strcmp(argv[1], "test") != 0) { /* a role, run in a group */
        const char *p = getenv("TENSORALLOC_PRESSURE");
        bool pressure = p && strcmp(p, "1") == 0;
        scenario_t sc = {.limit = 400, .model = 40, .budget = 320, .grow = 200};
        const char *v = getenv("TA_PRESSURE_SCENARIO");
        if (v && sscanf(v, "%zu %zu %zu %zu %d", &sc.limit, &sc.model, &sc.budget, &sc.grow,
                        &sc.rounds) != 5)
            return 2;
        if (strcmp(argv[1], "pool") == 0)
            return role_pool(pressure);
        if (strcmp(argv[1], "cache") == 0 && argc == 4)
            return role_cache(argv[2], atoi(argv[3]), pressure, &sc);
        if (strcmp(argv[1], "rule") == 0 && argc == 3)
            return role_rule(atoi(argv[2]));
        if (strcmp(argv[1], "plain") == 0 && argc == 4)
            return role_plain(argv[2], atoi(argv[3]), &sc);
        if (strcmp(argv[1], "grow") == 0) {
            grow(sc.grow,
                 sc.rounds ? 2000 : 5000); /* the test: slower, a margin for the 2-core CI */
            usleep(3000000);
            return 0;
        }
        return 2;
    }
    printf("TAP version 13\n1..6\n");
    const char *why = skip_reason();
    if (why) {
        for (int i = 1; i <= 6; i++)
            printf("ok %d # SKIP %s\n", i, why);
        return 0;
    }
    char dir[] = "/tmp/ta-pressure-XXXXXX";
    if (!mkdtemp(dir) || !make_models(dir, 40)) {
        printf("Bail out! cannot write the model files in /tmp\n");
        return 1;
    }
    case_pool(false, false);
    case_pool(true, false);
    case_cache(dir, false);
    case_cache(dir, true);
    case_rule();
    case_pool(true, true);
    remove_models(dir);
    return 0;
}
