/* SPDX-License-Identifier: MIT */
/*
 * The model cache's RAM side: entries of tensors keyed by name, a RAM and a
 * VRAM budget, LRU eviction of unlocked entries, loads from raw and
 * safetensors files straight into per-tensor memory (each large tensor its
 * own tensoralloc mapping), the keep-alive timer, and the statistics and
 * memory-snapshot diffs that InvokeAI's cache logged. Device moves and
 * loads straight to the device are cache_device.c's; this file knows no
 * CUDA, and never calls that side (device copies are freed through the CUDA
 * module itself).
 *
 * One mutex guards the cache's lists and counters. File reads, copies and
 * frees happen outside it: a load reserves its bytes and inserts a locked
 * "loading" entry, reads, then publishes it; evicted entries are unlinked
 * under the mutex and freed after it is released. An entry built by its
 * caller (ta_cache_create_entry) is "loading" too until the builder unlocks
 * it, so its tensor array, which grows while it is built, is never read by
 * another thread before it stops changing: readers of a complete entry need
 * no lock but the entry's own.
 */
#define _GNU_SOURCE
#include "base/list.h"
#include "cache_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static TA_TLS char last_error[256];
static TA_TLS int last_code;

int ta_cache_last_error(const char **message)
{
    if (message)
        *message = last_code ? last_error : "no error";
    return last_code;
}

const char *_ta_cache_last_message(void)
{
    return last_error;
}

int _ta_cache_fail(int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    last_code = rc;
    return rc;
}

void _ta_cache_log(ta_cache_t *c, ta_log_level_t level, const char *fmt, ...)
{
    if (!c->cfg.log || level > c->cfg.log_level)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->cfg.log(c->cfg.log_arg, level, msg);
}

void _ta_cache_log_snapshot_diff(ta_cache_t *c, const ta_memory_snapshot_t *before)
{
    if (!c->cfg.log || c->cfg.log_level < TA_LOG_DEBUG)
        return;
    ta_memory_snapshot_t after;
    ta_memory_snapshot(&after);
    char buf[1024];
    ta_memory_snapshot_diff(before, &after, buf, sizeof buf);
    /* Line by line, with no hidden state (strtok's is the process's, and
     * caches log from many threads). */
    for (char *line = buf, *next; *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        else
            next = line + strlen(line);
        if (*line)
            _ta_cache_log(c, TA_LOG_DEBUG, "%s", line);
    }
}

void _ta_cache_snapshot_if_debug(ta_cache_t *c, ta_memory_snapshot_t *s)
{
    if (c->cfg.log && c->cfg.log_level >= TA_LOG_DEBUG)
        ta_memory_snapshot(s);
}

/* ---- entries and the LRU list (cache mutex held) ----------------------------- */

static ta_entry_t *find(ta_cache_t *c, const char *key)
{
    for (ta_entry_t *e = c->head; e; e = e->next)
        if (strcmp(e->key, key) == 0)
            return e;
    return NULL;
}

static void lru_unlink(ta_cache_t *c, ta_entry_t *e)
{
    TA_LIST_UNLINK_TAIL(c->head, c->tail, e);
}

static void lru_push_recent(ta_cache_t *c, ta_entry_t *e)
{
    TA_LIST_PUSH_TAIL(c->head, c->tail, e);
}

static void record_size(ta_cache_t *c, const char *key, uint64_t bytes)
{
    for (size_t i = 0; i < c->nsizes; i++)
        if (strcmp(c->sizes[i].key, key) == 0) {
            if (bytes > c->sizes[i].bytes)
                c->sizes[i].bytes = bytes;
            return;
        }
    size_record_t *grown = realloc(c->sizes, (c->nsizes + 1) * sizeof *grown);
    char *k = strdup(key);
    if (!grown || !k) {
        free(k);
        if (grown)
            c->sizes = grown;
        return; /* statistics only: losing one record is not an error */
    }
    c->sizes = grown;
    c->sizes[c->nsizes++] = (size_record_t){k, bytes};
}

static void watermark(ta_cache_t *c)
{
    if (c->ram_used > c->st.high_watermark)
        c->st.high_watermark = c->ram_used;
}

/* Whether need more bytes on top of used go past budget (without wrapping). */
static bool over_budget(size_t used, size_t need, size_t budget)
{
    return need > budget || used > budget - need;
}

/* Takes e out of the cache (its memory is freed later by entry_free). */
static void detach(ta_cache_t *c, ta_entry_t *e)
{
    lru_unlink(c, e);
    c->ram_used -= e->ram_bytes;
    c->vram_used -= e->vram_bytes;
    c->count--;
}

/* A device copy (NULL: none), freed on eviction, removal and the last
 * unlock through the CUDA module: the device side is never called back. */
static void device_free(void *dev)
{
    if (dev)
        ta_cuda_device_free(dev);
}

/* A mapped entry's file: its lease given up, its mapping unmapped. Not
 * under c->mu: the stop may wait for the guard thread's copy. */
static void unmap_file(_ta_file_guard_t *g)
{
    if (!g)
        return;
    _ta_file_guard_stop(g);
    if (!g->lost)
        _ta_os_unmap(g->map, g->len);
    free(g);
}

static void entry_free(ta_entry_t *e)
{
    if (!e)
        return;
    if (e->guard) { /* the tensors' host memory is the mapping's */
        unmap_file(e->guard);
        e->guard = NULL;
        for (size_t i = 0; i < e->count; i++)
            e->tensors[i].data = NULL;
    }
    for (size_t i = 0; i < e->count; i++) {
        ta_free(e->tensors[i].data);
        device_free(e->tensors[i].dev);
        free(e->tensors[i].name);
    }
    free(e->tensors);
    free(e->key);
    free(e);
}

void _ta_cache_victims_free(victims_t *v)
{
    for (size_t i = 0; i < v->nwhole; i++)
        entry_free(v->whole[i]);
    for (size_t i = 0; i < v->ndevice; i++) {
        for (void **d = v->device[i]; *d; d++)
            device_free(*d);
        free(v->device[i]);
    }
}

/* The least recently used entry that may lose memory now: unlocked, not
 * loading, and holding bytes of the kind asked for. */
static ta_entry_t *lru_victim(ta_cache_t *c, bool on_device)
{
    for (ta_entry_t *e = c->head; e; e = e->next)
        if (e->locks == 0 && !e->loading && (on_device ? e->vram_bytes : e->ram_bytes) > 0)
            return e;
    return NULL;
}

#define PRESSURE_CALM_MS_DEFAULT 10000
#define RULE_LOOK_MS 1000

/* The RAM budget in force (mutex held): with ram_budget 0, the rule's for
 * the memory the machine and the cgroup have now; lowered by pressure, it
 * grows back an eighth of the budget each calm period. */
static size_t budget_now(ta_cache_t *c)
{
    uint64_t now = _ta_os_now_ms();
    if (c->budget_from_rule && now - c->rule_ms >= RULE_LOOK_MS) {
        c->rule_ms = now;
        size_t b = ta_cache_budget_rule(0, c->cfg.vram_budget, c->cfg.device_working_mem);
        if (b != c->cfg.ram_budget) {
            _ta_cache_log(c, TA_LOG_INFO, "RAM budget %zu MiB -> %zu MiB (the memory limit changed)",
                          c->cfg.ram_budget >> 20, b >> 20);
            c->cfg.ram_budget = b;
            c->st.ram_budget = b;
        }
    }
    if (c->lowered) {
        uint64_t calm = c->cfg.pressure_calm_ms ? c->cfg.pressure_calm_ms : PRESSURE_CALM_MS_DEFAULT;
        uint64_t periods = (now - c->calm_since_ms) / calm;
        if (periods) { /* eight periods bring it all back */
            c->calm_since_ms += periods * calm;
            size_t step = c->cfg.ram_budget / 8;
            c->lowered = periods >= 8 ? 0 : c->lowered + (size_t)periods * step;
            if (c->lowered >= c->cfg.ram_budget)
                c->lowered = 0;
            _ta_cache_log(c, TA_LOG_INFO, "no memory pressure for %llu ms: RAM budget back to %zu MiB",
                          (unsigned long long)(periods * calm),
                          (c->lowered ? c->lowered : c->cfg.ram_budget) >> 20);
        }
    }
    return c->lowered && c->lowered < c->cfg.ram_budget ? c->lowered : c->cfg.ram_budget;
}

/* Evicts least recently used unlocked entries until need more RAM bytes
 * fit the budget. Returns 0, or TA_ECACHEFULL when the rest is locked (or
 * too many victims for one pass; the caller retries). */
static int make_room_ram(ta_cache_t *c, size_t need, victims_t *v)
{
    while (over_budget(c->ram_used, need, budget_now(c))) {
        ta_entry_t *victim = lru_victim(c, false);
        if (!victim || v->nwhole == 64)
            return victim ? EAGAIN : TA_ECACHEFULL;
        detach(c, victim);
        v->whole[v->nwhole++] = victim;
        c->st.cleared++;
        _ta_cache_log(c, TA_LOG_DEBUG, "evicted '%s' (%zu bytes) to make room", victim->key,
                      victim->ram_bytes);
    }
    return 0;
}

/* Makes need VRAM bytes fit: device copies of unlocked entries go, least
 * recently used first; an entry with no host copy goes whole. */
int _ta_cache_make_room_vram(ta_cache_t *c, size_t need, victims_t *v)
{
    while (over_budget(c->vram_used, need, c->cfg.vram_budget)) {
        ta_entry_t *victim = lru_victim(c, true);
        if (!victim)
            return TA_ECACHEFULL;
        if (v->nwhole == 64 || v->ndevice == 64)
            return EAGAIN;
        void **devs = victim->ram_bytes ? calloc(victim->count + 1, sizeof *devs) : NULL;
        if (victim->ram_bytes == 0 || devs == NULL) { /* no host copy: it goes whole */
            free(devs);
            detach(c, victim);
            v->whole[v->nwhole++] = victim;
            c->st.cleared++;
        } else { /* unlocked, so nobody else touches its tensors now */
            size_t k = 0;
            for (size_t i = 0; i < victim->count; i++)
                if (victim->tensors[i].dev) {
                    devs[k++] = victim->tensors[i].dev;
                    victim->tensors[i].dev = NULL;
                }
            c->vram_used -= victim->vram_bytes;
            victim->vram_bytes = 0;
            v->device[v->ndevice++] = devs;
        }
    }
    return 0;
}

/* Reserves need RAM bytes under the budget, evicting as needed; applies
 * the overflow policy. Cache mutex held; victims are freed by the caller
 * after unlocking. */
static int reserve_ram(ta_cache_t *c, size_t need, victims_t *v, const char *what)
{
    if (need > c->cfg.ram_budget && c->cfg.overflow == TA_OVERFLOW_REFUSE)
        return _ta_cache_fail(TA_EBUDGET, "%s needs %zu bytes, more than the RAM budget of %zu",
                              what, need, c->cfg.ram_budget);
    int rc = make_room_ram(c, need, v);
    if (rc == TA_ECACHEFULL) {
        size_t budget = budget_now(c);
        const char *why = budget < c->cfg.ram_budget ? " (lowered by memory pressure)" : "";
        if (c->cfg.overflow == TA_OVERFLOW_REFUSE)
            return _ta_cache_fail(
                rc, "%s needs %zu bytes: %zu of %zu%s in use and the rest is locked", what, need,
                c->ram_used, budget, why);
        c->st.over_budget_admits++;
        _ta_cache_log(c, TA_LOG_WARN, "%s admitted over the RAM budget: %zu + %zu > %zu%s", what,
                      c->ram_used, need, budget, why);
        rc = 0;
    }
    if (rc == 0) {
        c->ram_used += need;
        watermark(c);
    }
    return rc;
}

/* Charges need more RAM bytes to a locked entry, evicting others as
 * needed (victims are freed outside the mutex; a pass that collected too
 * many to hold goes again). */
int _ta_cache_charge_entry(ta_cache_t *c, ta_entry_t *e, size_t need, const char *what, bool record)
{
    int rc;
    victims_t v;
    do {
        v = (victims_t){0};
        pthread_mutex_lock(&c->mu);
        if (e->locks <= 0)
            rc = _ta_cache_fail(EINVAL, "entry '%s' is not locked", e->key);
        else if ((rc = reserve_ram(c, need, &v, what)) == 0) {
            e->ram_bytes += need;
            if (record)
                record_size(c, e->key, e->ram_bytes);
        }
        pthread_mutex_unlock(&c->mu);
        _ta_cache_victims_free(&v);
    } while (rc == EAGAIN);
    return rc;
}

/* ---- creation ----------------------------------------------------------------- */

size_t ta_cache_budget_rule(size_t memory, size_t vram_budget, size_t device_working_mem)
{
    const size_t GiB = (size_t)1 << 30;
    if (memory == 0) {
        memory = _ta_os_physical_memory();
        size_t limit = _ta_os_cgroup_memory_limit();
        if (limit && (limit < memory || memory == 0))
            memory = limit;
    }
    size_t half = memory / 2;
    size_t budget = half > 2 * GiB ? half - 2 * GiB : 0;
    size_t cap = 32 * GiB;
    if (vram_budget)
        cap = vram_budget > device_working_mem ? vram_budget - device_working_mem : 0;
    if (budget > cap)
        budget = cap;
    size_t floor = half < 4 * GiB ? half : 4 * GiB;
    return budget > floor ? budget : floor;
}

/* Memory pressure (a listener of the allocator's, on its purge thread,
 * after the allocator gave back what no one used): the budget in force
 * drops by a quarter of what the cache holds, less what the allocator
 * gave back, not below pressure_floor; unlocked entries are evicted, least
 * recently used first, down to it (InvokeAI's order). */
static void cache_pressure(const ta_pressure_event_t *ev, void *arg)
{
    ta_cache_t *c = arg;
    ta_cache_pressure_event_t out = {
        .sources = ev->sources, .figure = ev->figure, .released_bytes = ev->released_bytes};
    pthread_mutex_lock(&c->mu);
    size_t budget = budget_now(c);
    size_t cut = c->ram_used / 4;
    cut = ev->released_bytes >= cut ? 0 : cut - (size_t)ev->released_bytes;
    size_t target = c->ram_used - cut;
    if (target > budget)
        target = budget;
    if (target < c->cfg.pressure_floor)
        target = c->cfg.pressure_floor < budget ? c->cfg.pressure_floor : budget;
    c->lowered = target ? target : 1; /* 1: lowered to nothing (0 means not lowered) */
    c->calm_since_ms = _ta_os_now_ms();
    c->st.pressure_events++;
    c->st.pressure_released_bytes += ev->released_bytes;
    for (;;) {
        victims_t v = {0};
        ta_entry_t *victim;
        while (c->ram_used > target && v.nwhole < 64 && (victim = lru_victim(c, false))) {
            out.evicted_bytes += victim->ram_bytes;
            out.evicted_entries++;
            c->st.pressure_evicted_bytes += victim->ram_bytes;
            c->st.cleared++;
            detach(c, victim);
            v.whole[v.nwhole++] = victim;
        }
        if (v.nwhole == 0)
            break;
        pthread_mutex_unlock(&c->mu);
        _ta_cache_victims_free(&v); /* the allocator gives it back when the listeners return */
        pthread_mutex_lock(&c->mu);
    }
    out.ram_used = c->ram_used;
    out.budget = budget_now(c);
    pthread_mutex_unlock(&c->mu);
    _ta_cache_log(c, TA_LOG_INFO,
                  "memory pressure (%s): the allocator gave back %llu MiB; evicted %llu entries "
                  "(%llu MiB); %llu MiB in use, budget now %llu MiB",
                  ev->figure, (unsigned long long)(ev->released_bytes >> 20),
                  (unsigned long long)out.evicted_entries,
                  (unsigned long long)(out.evicted_bytes >> 20),
                  (unsigned long long)(out.ram_used >> 20), (unsigned long long)(out.budget >> 20));
    if (c->cfg.on_pressure)
        c->cfg.on_pressure(&out, c->cfg.on_pressure_arg);
}

/* The keep-alive timer: evicts unlocked entries unused for keep_alive_ms,
 * waking when the oldest of them comes due. */
static void *keeper_main(void *arg)
{
    ta_cache_t *c = arg;
    uint64_t keep = c->cfg.keep_alive_ms;
    pthread_mutex_lock(&c->mu);
    while (!c->stopping) {
        uint64_t now = _ta_os_now_ms(), next = now + keep;
        victims_t v = {0};
        for (ta_entry_t *e = c->head, *after; e && v.nwhole < 64; e = after) {
            after = e->next;
            if (e->locks || e->loading)
                continue;
            if (now - e->used_ms >= keep) {
                detach(c, e);
                v.whole[v.nwhole++] = e;
                c->st.expired++;
                _ta_cache_log(c, TA_LOG_INFO, "'%s' unused for %llu ms: evicted", e->key,
                              (unsigned long long)(now - e->used_ms));
            } else if (e->used_ms + keep < next) {
                next = e->used_ms + keep;
            }
        }
        if (v.nwhole) {
            pthread_mutex_unlock(&c->mu);
            _ta_cache_victims_free(&v);
            pthread_mutex_lock(&c->mu);
            continue;
        }
        struct timespec ts;
        _ta_os_deadline(true, next - now + 1, &ts);
        pthread_cond_timedwait(&c->wake_keeper, &c->mu, &ts);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Every field a caller sets, checked (the budgets and device_working_mem
 * take any value: the arithmetic on them cannot wrap). */
static int config_check(const ta_cache_config_t *g)
{
    if ((unsigned)g->overflow > TA_OVERFLOW_ADMIT)
        return _ta_cache_fail(EINVAL, "overflow %d is not a ta_overflow_t (0: refuse, 1: admit)",
                              (int)g->overflow);
    if (g->device < 0)
        return _ta_cache_fail(EINVAL, "device %d is not a CUDA device ordinal (0 or more)",
                              g->device);
    if ((unsigned)g->log_level > TA_LOG_DEBUG)
        return _ta_cache_fail(EINVAL,
                              "log_level %d is not a ta_log_level_t (0: errors to 3: debug)",
                              (int)g->log_level);
    if (g->load_threads < 0)
        return _ta_cache_fail(EINVAL, "load_threads %d is negative (0: one per core)",
                              g->load_threads);
    if (g->load_chunk > TA_CACHE_MAX_LOAD_CHUNK) /* rounding it up, and 4 of it, must not wrap */
        return _ta_cache_fail(EINVAL, "load_chunk %zu is over the limit of %zu bytes (0: 4 MiB)",
                              g->load_chunk, TA_CACHE_MAX_LOAD_CHUNK);
    if ((unsigned)g->page_cache >= TA_PAGE_CACHE_COUNT_)
        return _ta_cache_fail(
            EINVAL, "page_cache %d is not a ta_page_cache_t (0: keep, 1: drop, 2: bypass, 3: map)",
            (int)g->page_cache);
    if (g->keep_alive_ms > TA_CACHE_MAX_KEEP_ALIVE_MS) /* the timer's deadlines must not wrap */
        return _ta_cache_fail(
            EINVAL, "keep_alive_ms %llu is over the limit of %llu (a year; 0: never)",
            (unsigned long long)g->keep_alive_ms, (unsigned long long)TA_CACHE_MAX_KEEP_ALIVE_MS);
    if ((unsigned)g->pressure > TA_CACHE_PRESSURE_IGNORE)
        return _ta_cache_fail(EINVAL,
                              "pressure %d is not a ta_cache_pressure_t (0: give way, 1: ignore)",
                              (int)g->pressure);
    if (g->pressure_calm_ms > TA_CACHE_MAX_PRESSURE_CALM_MS)
        return _ta_cache_fail(EINVAL,
                              "pressure_calm_ms %llu is over the limit of %llu (a day; 0: 10 s)",
                              (unsigned long long)g->pressure_calm_ms,
                              (unsigned long long)TA_CACHE_MAX_PRESSURE_CALM_MS);
    return 0;
}

int ta_cache_create(const ta_cache_config_t *config, ta_cache_t **out)
{
    if (!config || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    /* smaller: an older caller's (the fields it lacks are 0); larger: a newer
     * caller's, whose fields this library would ignore */
    if (config->size < offsetof(ta_cache_config_t, log) || config->size > sizeof *config)
        return _ta_cache_fail(
            EINVAL,
            "config size %zu is not sizeof(ta_cache_config_t) (%zu; at least %zu from "
            "older callers)",
            config->size, sizeof *config, offsetof(ta_cache_config_t, log));
    ta_cache_config_t cfg = {0};
    memcpy(&cfg, config, config->size);
    cfg.size = sizeof cfg;
    int rc = config_check(&cfg);
    if (rc)
        return rc;
    ta_cache_t *c = calloc(1, sizeof *c);
    if (!c)
        return _ta_cache_fail(ENOMEM, "no memory for a cache");
    c->cfg = cfg;
    if (c->cfg.ram_budget == 0) {
        c->cfg.ram_budget = ta_cache_budget_rule(0, c->cfg.vram_budget, c->cfg.device_working_mem);
        c->budget_from_rule = true;
        c->rule_ms = _ta_os_now_ms();
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->loaded, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&c->wake_keeper, &attr);
    pthread_condattr_destroy(&attr);
    c->st.ram_budget = c->cfg.ram_budget;
    c->st.vram_budget = c->cfg.vram_budget;
    if (c->cfg.keep_alive_ms) {
        if ((rc = _ta_os_thread_start(keeper_main, c, &c->keeper)) != 0) {
            ta_cache_destroy(c);
            return _ta_cache_fail(rc, "cannot start the keep-alive timer: %s", strerror(rc));
        }
        c->has_keeper = true;
    }
    if (c->cfg.pressure == TA_CACHE_PRESSURE_GIVE_WAY) {
        if ((rc = ta_pressure_listen(cache_pressure, c)) != 0)
            _ta_cache_log(c, TA_LOG_WARN, "cannot hear memory pressure: %s", ta_strerror(rc));
        c->listening = rc == 0;
    }
    *out = c;
    return 0;
}

void ta_cache_destroy(ta_cache_t *c)
{
    if (!c)
        return;
    if (c->listening) /* waits for a response in progress */
        ta_pressure_unlisten(cache_pressure, c);
    if (c->has_keeper) {
        pthread_mutex_lock(&c->mu);
        c->stopping = true;
        pthread_cond_signal(&c->wake_keeper);
        pthread_mutex_unlock(&c->mu);
        _ta_os_thread_join(c->keeper);
    }
    for (ta_entry_t *e = c->head, *next; e; e = next) {
        next = e->next;
        entry_free(e);
    }
    for (size_t i = 0; i < c->nsizes; i++)
        free(c->sizes[i].key);
    free(c->sizes);
    ta_pinned_pool_destroy(c->pool);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->loaded);
    pthread_cond_destroy(&c->wake_keeper);
    free(c);
}

static ta_entry_t *entry_new(ta_cache_t *c, const char *key)
{
    ta_entry_t *e = calloc(1, sizeof *e);
    if (!e || !(e->key = strdup(key))) {
        free(e);
        return NULL;
    }
    e->cache = c;
    e->locks = 1;
    return e;
}

/* Inserts a new locked entry with need bytes reserved, making room; it is
 * loading (gets wait) until published, or with building until its builder
 * unlocks it. */
int _ta_cache_insert_reserved(ta_cache_t *c, const char *key, size_t need, bool building,
                              ta_entry_t **out)
{
    ta_entry_t *e = entry_new(c, key);
    if (!e)
        return _ta_cache_fail(ENOMEM, "no memory for an entry '%s'", key);
    e->loading = true;
    e->building = building;
    e->builder = pthread_self();
    e->ram_bytes = need;
    int rc;
    victims_t v = {0};
    for (;;) {
        pthread_mutex_lock(&c->mu);
        if (find(c, key)) {
            rc = _ta_cache_fail(EEXIST, "an entry '%s' already exists", key);
        } else {
            rc = reserve_ram(c, need, &v, key);
            if (rc == 0) {
                lru_push_recent(c, e);
                c->count++;
            }
        }
        pthread_mutex_unlock(&c->mu);
        _ta_cache_victims_free(&v);
        if (rc != EAGAIN)
            break;
        v.nwhole = v.ndevice = 0;
    }
    if (rc) {
        entry_free(e);
        return rc;
    }
    *out = e;
    return 0;
}

/* Removes an entry whose load failed; its reservation goes back. */
void _ta_cache_abandon_entry(ta_cache_t *c, ta_entry_t *e)
{
    pthread_mutex_lock(&c->mu);
    detach(c, e);
    e->loading = false;
    pthread_cond_broadcast(&c->loaded);
    pthread_mutex_unlock(&c->mu);
    entry_free(e);
}

void _ta_cache_publish(ta_cache_t *c, ta_entry_t *e, uint64_t bytes, double seconds,
                       const _ta_load_report_t *rep)
{
    pthread_mutex_lock(&c->mu);
    e->loading = false;
    e->used_ms = _ta_os_now_ms();
    load_record_t *r = &c->recent[c->st.loads % TA_CACHE_RECENT_LOADS];
    snprintf(r->key, sizeof r->key, "%s", e->key);
    r->bytes = bytes;
    r->seconds = seconds;
    r->readers = rep->threads;
    r->direct = rep->direct;
    c->st.loads++;
    c->st.load_bytes += bytes;
    c->st.load_seconds += seconds;
    c->st.mapped_loads += rep->mapped;
    record_size(c, e->key, bytes);
    pthread_cond_broadcast(&c->loaded);
    pthread_mutex_unlock(&c->mu);
}

/* ---- tensors --------------------------------------------------------------------- */

static int tensor_bytes(ta_dtype_t dtype, int ndim, const int64_t *shape, size_t *out)
{
    size_t es = ta_dtype_size(dtype);
    if (es == 0)
        return _ta_cache_fail(EINVAL, "unknown dtype %d", (int)dtype);
    if (ndim < 0 || ndim > TA_MAX_DIMS || (ndim > 0 && !shape))
        return _ta_cache_fail(EINVAL, "bad number of dimensions %d", ndim);
    size_t n = es;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return _ta_cache_fail(EINVAL, "negative dimension %lld", (long long)shape[i]);
        if (__builtin_mul_overflow(n, (size_t)shape[i], &n))
            return _ta_cache_fail(EINVAL, "shape overflows");
    }
    if (n > PTRDIFF_MAX) /* refused before any eviction: no allocation is this large */
        return _ta_cache_fail(EINVAL, "a tensor of %zu bytes is larger than any allocation can be",
                              n);
    *out = n;
    return 0;
}

static int entry_append(ta_entry_t *e, const char *name, ta_dtype_t dtype, int ndim,
                        const int64_t *shape, size_t nbytes, void *data)
{
    if (e->count == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 16;
        tensor_t *grown = realloc(e->tensors, cap * sizeof *grown);
        if (!grown)
            return ENOMEM;
        e->tensors = grown;
        e->cap = cap;
    }
    tensor_t *t = &e->tensors[e->count];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return ENOMEM;
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++)
        t->shape[i] = shape[i];
    t->nbytes = nbytes;
    t->data = data;
    e->count++;
    return 0;
}

/* ---- loading ------------------------------------------------------------------------ */

_ta_load_opts_t _ta_cache_load_opts(const ta_cache_t *c)
{
    /* what is not mapped (raw files, loads to the device, refused leases) is read as KEEP */
    ta_page_cache_t pc =
        c->cfg.page_cache == TA_PAGE_CACHE_MAP ? TA_PAGE_CACHE_KEEP : c->cfg.page_cache;
    return (_ta_load_opts_t){
        .threads = c->cfg.load_threads, .chunk = c->cfg.load_chunk, .page_cache = pc};
}

/* Reads the spans into a loading entry and publishes it, or abandons it. */
static int load_entry(ta_cache_t *c, ta_entry_t *e, const char *path, int fd, _ta_span_t *spans,
                      size_t n, uint64_t total, double t0)
{
    _ta_load_opts_t opts = _ta_cache_load_opts(c);
    _ta_load_report_t rep = {0};
    char why[200] = "";
    int rc = _ta_load_spans(path, fd, spans, n, &opts, &rep, why, sizeof why);
    double dt = _ta_os_now_s() - t0;
    if (rc) {
        _ta_cache_abandon_entry(c, e);
        return _ta_cache_fail(rc, "%s: %s", path, why);
    }
    _ta_cache_publish(c, e, total, dt, &rep);
    _ta_cache_log(c, TA_LOG_INFO,
                  "loaded '%s' from %s: %zu tensors, %.3f GB in %.3f s (%.2f GB/s, %d reader%s%s)",
                  e->key, path, e->count, (double)total / 1e9, dt,
                  dt > 0 ? (double)total / dt / 1e9 : 0, rep.threads, rep.threads == 1 ? "" : "s",
                  rep.direct ? ", O_DIRECT" : "");
    return 0;
}

/* Opens path and fails with its message. */
static int open_file(const char *path, int *fd)
{
    int rc = _ta_os_open_read(path, 0, fd);
    return rc ? _ta_cache_fail(rc, "%s: %s", path, strerror(rc)) : 0;
}

/* Appends the header's tensors to e: with host memory each (large ones a
 * mapping each) and their reads in spans, or, spans NULL, without any (a
 * load straight to the device). */
int _ta_cache_append_header_tensors(ta_entry_t *e, const _ta_st_header_t *h, const char *path,
                                    _ta_span_t *spans)
{
    for (size_t i = 0; i < h->count; i++) {
        const _ta_st_tensor_t *st = &h->tensors[i];
        size_t n = (size_t)(st->end - st->begin);
        void *data = spans ? _ta_alloc_filled(n ? n : 1) : NULL; /* the readers fill it */
        if (spans && !data)
            return _ta_cache_fail(ENOMEM, "%s: no memory for tensor '%s' (%zu bytes)", path,
                                  st->name, n);
        int rc = entry_append(e, st->name, st->dtype, st->ndim, st->shape, n, data);
        if (rc) {
            ta_free(data);
            return rc;
        }
        if (spans)
            spans[i] = (_ta_span_t){data, h->data_start + st->begin, n};
    }
    return 0;
}

/* Opens path and reads its safetensors header; total: the data bytes. */
int _ta_cache_open_header(const char *path, int *fd, _ta_st_header_t *h, uint64_t *total)
{
    int rc;
    if ((rc = open_file(path, fd)) != 0)
        return rc;
    char why[200] = "";
    if ((rc = _ta_st_read_header(*fd, h, why, sizeof why)) != 0) {
        _ta_os_close(*fd);
        return rc == TA_EFORMAT ? _ta_cache_fail(rc, "%s: %s", path, why)
                                : _ta_cache_fail(rc, "%s: %s", path, strerror(rc));
    }
    *total = 0;
    for (size_t i = 0; i < h->count; i++)
        *total += h->tensors[i].end - h->tensors[i].begin;
    return 0;
}

/* The file guard's report, from its thread: the entry's file is about to
 * change and its mapping became a copy (or could not). */
static void mapping_copied(void *arg, const _ta_file_guard_t *g, int rc)
{
    ta_cache_t *c = arg;
    if (rc == 0) {
        atomic_fetch_add_explicit(&c->mapped_copied, 1, memory_order_relaxed);
        _ta_cache_log(c, TA_LOG_WARN,
                      "the file of entry '%s' is being written or truncated: its mapping "
                      "(%zu bytes) was copied into memory first",
                      g->what, g->len);
    } else {
        _ta_cache_log(c, TA_LOG_ERROR,
                      "the file of entry '%s' is being written or truncated and its mapping "
                      "could not be copied (%s): gets of it fail with EIO, and its holders' "
                      "reads may fault (SIGBUS)",
                      g->what, strerror(rc));
    }
}

/* Where the file cannot be mapped and leased: nothing done, the entry
 * still reserved, *fallback set; the caller reads the file instead. */
static int map_refused(ta_cache_t *c, ta_entry_t *e, const char *path, const char *why,
                       bool *fallback)
{
    _ta_cache_log(c, TA_LOG_INFO, "'%s': %s: %s; read into memory instead", e->key, path, why);
    *fallback = true;
    return 0;
}

/* TA_PAGE_CACHE_MAP: the tensors of a reserved entry become a private,
 * leased mapping of the file (up to its last tensor's end), faulted in by
 * the readers; published, or abandoned on failure. *fd goes to the entry
 * (-1 here). */
static int map_entry(ta_cache_t *c, ta_entry_t *e, const char *path, int *fd,
                     const _ta_st_header_t *h, uint64_t total, double t0, bool *fallback)
{
    char why[200] = "";
    uint64_t end = h->data_start, size;
    for (size_t i = 0; i < h->count; i++)
        if (h->data_start + h->tensors[i].end > end)
            end = h->data_start + h->tensors[i].end;
    if (end > SIZE_MAX / 2)
        return map_refused(c, e, path, "too large to map", fallback);
    _ta_file_guard_t *g = malloc(sizeof *g);
    void *map;
    int rc = g ? _ta_os_map_file(*fd, (size_t)end, &map) : ENOMEM;
    if (rc) {
        free(g);
        snprintf(why, sizeof why, "cannot map %llu bytes of it: %s", (unsigned long long)end,
                 strerror(rc));
        return map_refused(c, e, path, why, fallback);
    }
    *g = (_ta_file_guard_t){.fd = *fd,
                            .map = map,
                            .len = (size_t)end,
                            .what = e->key,
                            .copied = mapping_copied,
                            .arg = c};
    if (_ta_file_guard_start(g, why, sizeof why) != 0) {
        _ta_os_unmap(map, (size_t)end);
        free(g);
        return map_refused(c, e, path, why, fallback);
    }
    *fd = -1;
    e->guard = g;
    /* Pages the readers fault in from disk come as 2 MiB folios (readahead
     * by huge pages, Linux 6.16+ on ext4), which this and every later
     * mapping of the file takes whole: a 2 GiB model in about a
     * millisecond (docs/benchmarks.md "Mapped loads"). Refused where the
     * kernel has no transparent huge pages: the mapping then works page by
     * page. */
    if (end >= TA_HUGE_PAGE)
        _ta_os_advise_hugepage(map, (size_t)end);
    /* leased now: the file cannot shrink from here on */
    if ((rc = _ta_os_file_size(g->fd, &size)) == 0 && size < end) {
        _ta_cache_abandon_entry(c, e);
        return _ta_cache_fail(TA_EFORMAT, "%s: the file is shorter than its header says", path);
    }
    for (size_t i = 0; i < h->count && rc == 0; i++) {
        const _ta_st_tensor_t *st = &h->tensors[i];
        char *data = (char *)map + h->data_start + st->begin;
        rc = entry_append(e, st->name, st->dtype, st->ndim, st->shape,
                          (size_t)(st->end - st->begin), data);
    }
    _ta_load_opts_t opts = _ta_cache_load_opts(c);
    _ta_load_report_t rep = {.mapped = true};
    uint64_t from = h->data_start & ~(uint64_t)(_ta_os_page_size() - 1);
    if (rc == 0 && end > from)
        rc = _ta_loader_populate((char *)map + from, (size_t)(end - from), &opts, &rep, why,
                                 sizeof why);
    else if (rc)
        snprintf(why, sizeof why, "no memory for %zu tensors", h->count);
    double dt = _ta_os_now_s() - t0;
    if (rc) {
        _ta_cache_abandon_entry(c, e);
        return _ta_cache_fail(rc, "%s: %s", path, why);
    }
    _ta_cache_publish(c, e, total, dt, &rep);
    _ta_cache_log(c, TA_LOG_INFO,
                  "mapped '%s' from %s: %zu tensors, %.3f GB usable in %.3f s (%.2f GB/s, %d "
                  "reader%s)",
                  e->key, path, e->count, (double)total / 1e9, dt,
                  dt > 0 ? (double)total / dt / 1e9 : 0, rep.threads, rep.threads == 1 ? "" : "s");
    return 0;
}

int ta_cache_load_safetensors(ta_cache_t *c, const char *key, const char *path, ta_entry_t **out)
{
    if (!c || !key || !path || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    int fd, rc;
    _ta_st_header_t h;
    uint64_t total;
    if ((rc = _ta_cache_open_header(path, &fd, &h, &total)) != 0)
        return rc;
    ta_memory_snapshot_t before;
    _ta_cache_snapshot_if_debug(c, &before);
    ta_entry_t *e = NULL;
    _ta_span_t *spans = malloc((h.count ? h.count : 1) * sizeof *spans);
    if (!spans)
        rc = _ta_cache_fail(ENOMEM, "no memory for %zu tensors", h.count);
    else
        rc = _ta_cache_insert_reserved(c, key, (size_t)total, false, &e);
    double t0 = _ta_os_now_s();
    bool read = true;
    if (rc == 0 && c->cfg.page_cache == TA_PAGE_CACHE_MAP) {
        read = false;
        rc = map_entry(c, e, path, &fd, &h, total, t0, &read);
    }
    if (rc == 0 && read)
        rc = _ta_cache_append_header_tensors(e, &h, path, spans);
    if (e && rc && read)
        _ta_cache_abandon_entry(c, e);
    else if (e && read)
        rc = load_entry(c, e, path, fd, spans, h.count, total, t0);
    free(spans);
    if (fd >= 0)
        _ta_os_close(fd);
    _ta_st_free(&h);
    if (rc)
        return rc;
    _ta_cache_log_snapshot_diff(c, &before);
    *out = e;
    return 0;
}

int ta_cache_load_raw(ta_cache_t *c, const char *key, const char *path, ta_dtype_t dtype, int ndim,
                      const int64_t *shape, ta_entry_t **out)
{
    if (!c || !key || !path || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    size_t n;
    int rc = tensor_bytes(dtype, ndim, shape, &n);
    if (rc)
        return rc;
    int fd;
    if ((rc = open_file(path, &fd)) != 0)
        return rc;
    uint64_t size = 0;
    if ((rc = _ta_os_file_size(fd, &size)) != 0 || size != n) {
        _ta_os_close(fd);
        return rc ? _ta_cache_fail(rc, "%s: %s", path, strerror(rc))
                  : _ta_cache_fail(TA_EFORMAT, "%s: file is %llu bytes, the shape needs %zu", path,
                                   (unsigned long long)size, n);
    }
    ta_memory_snapshot_t before;
    _ta_cache_snapshot_if_debug(c, &before);
    ta_entry_t *e;
    if ((rc = _ta_cache_insert_reserved(c, key, n, false, &e)) != 0) {
        _ta_os_close(fd);
        return rc;
    }
    double t0 = _ta_os_now_s();
    void *data = _ta_alloc_filled(n ? n : 1);
    rc = data ? entry_append(e, "data", dtype, ndim, shape, n, data)
              : _ta_cache_fail(ENOMEM, "no memory for %zu bytes", n);
    if (rc) {
        ta_free(data);
        _ta_cache_abandon_entry(c, e);
    } else {
        _ta_span_t span = {data, 0, n};
        rc = load_entry(c, e, path, fd, &span, 1, n, t0);
    }
    _ta_os_close(fd);
    if (rc)
        return rc;
    _ta_cache_log_snapshot_diff(c, &before);
    *out = e;
    return 0;
}

int ta_cache_create_entry(ta_cache_t *c, const char *key, ta_entry_t **out)
{
    if (!c || !key || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    return _ta_cache_insert_reserved(c, key, 0, true, out);
}

int ta_entry_add_tensor(ta_entry_t *e, const char *name, ta_dtype_t dtype, int ndim,
                        const int64_t *shape, void **data)
{
    if (!e || !name || !data)
        return _ta_cache_fail(EINVAL, "NULL argument");
    size_t n;
    int rc = tensor_bytes(dtype, ndim, shape, &n);
    if (rc)
        return rc;
    ta_cache_t *c = e->cache;
    pthread_mutex_lock(&c->mu);
    bool building = e->building;
    pthread_mutex_unlock(&c->mu);
    if (!building) /* its array is read without the mutex by every holder */
        return _ta_cache_fail(EINVAL,
                              "entry '%s' is complete: tensors are added only while it is built, "
                              "before its creator unlocks it",
                              e->key);
    if ((rc = _ta_cache_charge_entry(c, e, n, name, true)) != 0)
        return rc;
    void *p = ta_malloc(n ? n : 1);
    if (!p || (rc = entry_append(e, name, dtype, ndim, shape, n, p)) != 0) {
        ta_free(p);
        pthread_mutex_lock(&c->mu);
        e->ram_bytes -= n;
        c->ram_used -= n;
        pthread_mutex_unlock(&c->mu);
        return _ta_cache_fail(ENOMEM, "no memory for tensor '%s' (%zu bytes)", name, n);
    }
    *data = p;
    return 0;
}

/* ---- lookups ------------------------------------------------------------------------- */

int ta_cache_get(ta_cache_t *c, const char *key, ta_entry_t **out)
{
    if (!c || !key || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    pthread_mutex_lock(&c->mu);
    ta_entry_t *e;
    while ((e = find(c, key)) && e->loading) {
        if (e->building && pthread_equal(e->builder, pthread_self())) {
            pthread_mutex_unlock(&c->mu);
            return _ta_cache_fail(
                EDEADLK, "entry '%s' is under construction by this thread: unlock it first", key);
        }
        pthread_cond_wait(&c->loaded, &c->mu);
    }
    if (!e) {
        c->st.misses++;
        pthread_mutex_unlock(&c->mu);
        return _ta_cache_fail(ENOENT, "no entry '%s'", key);
    }
    if (e->guard && atomic_load(&e->guard->broken)) {
        pthread_mutex_unlock(&c->mu);
        return _ta_cache_fail(EIO,
                              "entry '%s': its file changed on disk and its mapping could not be "
                              "copied first; remove it and load it again",
                              key);
    }
    c->st.hits++;
    e->locks++;
    e->used_ms = _ta_os_now_ms();
    lru_unlink(c, e);
    lru_push_recent(c, e);
    pthread_mutex_unlock(&c->mu);
    *out = e;
    return 0;
}

/* The copy a move left for other holders goes with the last of them. */
static void drop_copies_locked(ta_cache_t *c, ta_entry_t *e, void **host, void **dev)
{
    for (size_t i = 0; i < e->count; i++) {
        if (e->drop_host) {
            host[i] = e->guard ? NULL : e->tensors[i].data; /* a mapping goes whole */
            e->tensors[i].data = NULL;
        }
        if (e->drop_device) {
            dev[i] = e->tensors[i].dev;
            e->tensors[i].dev = NULL;
        }
    }
    if (e->drop_host) {
        c->ram_used -= e->ram_bytes;
        e->ram_bytes = 0;
    }
    if (e->drop_device) {
        c->vram_used -= e->vram_bytes;
        e->vram_bytes = 0;
    }
    e->drop_host = e->drop_device = false;
}

/* Called with c->mu held, releases it: frees the copies marked drop_* if
 * at most holders hold e, outside the mutex. */
void _ta_cache_drop_marked_and_unlock(ta_cache_t *c, ta_entry_t *e, int holders)
{
    void **host = NULL, **dev = NULL;
    size_t n = 0;
    _ta_file_guard_t *mapping = NULL;
    if (e->locks <= holders && (e->drop_host || e->drop_device)) {
        host = calloc(e->count + 1, sizeof *host);
        dev = calloc(e->count + 1, sizeof *dev);
        if (host && dev) { /* else the copy stays until eviction frees it */
            n = e->count;
            if (e->drop_host) { /* a mapping goes whole, after the mutex */
                mapping = e->guard;
                drop_copies_locked(c, e, host, dev);
                e->guard = NULL;
            } else {
                drop_copies_locked(c, e, host, dev);
            }
        }
    }
    pthread_mutex_unlock(&c->mu);
    unmap_file(mapping);
    for (size_t i = 0; i < n; i++) {
        ta_free(host[i]);
        device_free(dev[i]);
    }
    free(host);
    free(dev);
}

void ta_entry_unlock(ta_entry_t *e)
{
    if (!e)
        return;
    ta_cache_t *c = e->cache;
    pthread_mutex_lock(&c->mu);
    if (e->locks > 0)
        e->locks--;
    e->used_ms = _ta_os_now_ms();
    if (e->building && e->locks == 0) { /* built: gets may have it now */
        e->building = e->loading = false;
        pthread_cond_broadcast(&c->loaded);
    }
    _ta_cache_drop_marked_and_unlock(c, e, 0);
}

int ta_cache_remove(ta_cache_t *c, const char *key)
{
    if (!c || !key)
        return _ta_cache_fail(EINVAL, "NULL argument");
    pthread_mutex_lock(&c->mu);
    ta_entry_t *e = find(c, key);
    int rc = 0;
    if (!e)
        rc = _ta_cache_fail(ENOENT, "no entry '%s'", key);
    else if (e->locks > 0 || e->loading)
        rc = _ta_cache_fail(EBUSY, "entry '%s' is locked", key);
    else
        detach(c, e);
    pthread_mutex_unlock(&c->mu);
    if (rc == 0)
        entry_free(e);
    return rc;
}

bool ta_cache_contains(ta_cache_t *c, const char *key)
{
    if (!c || !key)
        return false;
    pthread_mutex_lock(&c->mu);
    bool found = find(c, key) != NULL;
    pthread_mutex_unlock(&c->mu);
    return found;
}

int ta_cache_keys(ta_cache_t *c, char ***keys, size_t *count)
{
    if (!c || !keys || !count)
        return _ta_cache_fail(EINVAL, "NULL argument");
    pthread_mutex_lock(&c->mu);
    size_t n = 0, bytes = 0;
    for (ta_entry_t *e = c->head; e; e = e->next, n++)
        bytes += strlen(e->key) + 1;
    /* one block: the pointer array, then the strings */
    char **out = malloc((n + 1) * sizeof *out + bytes);
    if (out) {
        char *text = (char *)(out + n + 1);
        size_t i = 0;
        for (ta_entry_t *e = c->head; e; e = e->next) {
            out[i++] = strcpy(text, e->key);
            text += strlen(e->key) + 1;
        }
        out[n] = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    if (!out)
        return _ta_cache_fail(ENOMEM, "no memory for %zu keys", n);
    *keys = out;
    *count = n;
    return 0;
}

void ta_cache_keys_free(char **keys)
{
    free(keys);
}

const char *ta_entry_key(const ta_entry_t *e)
{
    return e ? e->key : NULL;
}

size_t ta_entry_tensor_count(const ta_entry_t *e)
{
    return e ? e->count : 0;
}

size_t ta_entry_ram_bytes(const ta_entry_t *e)
{
    return e ? e->ram_bytes : 0;
}

size_t ta_entry_vram_bytes(const ta_entry_t *e)
{
    return e ? e->vram_bytes : 0;
}

int ta_entry_tensor_at(const ta_entry_t *e, size_t index, ta_tensor_t *out)
{
    if (!e || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    if (index >= e->count)
        return _ta_cache_fail(EINVAL, "index %zu is past the %zu tensors of entry '%s'", index,
                              e->count, e->key);
    const tensor_t *t = &e->tensors[index];
    out->name = t->name;
    out->dtype = t->dtype;
    out->ndim = t->ndim;
    memcpy(out->shape, t->shape, sizeof out->shape);
    out->nbytes = t->nbytes;
    out->data = t->data;
    out->device_data = t->dev;
    return 0;
}

int ta_entry_tensor(const ta_entry_t *e, const char *name, ta_tensor_t *out)
{
    if (!e || !name || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    for (size_t i = 0; i < e->count; i++)
        if (strcmp(e->tensors[i].name, name) == 0)
            return ta_entry_tensor_at(e, i, out);
    return _ta_cache_fail(ENOENT, "entry '%s' has no tensor '%s'", e->key, name);
}

/* ---- statistics ------------------------------------------------------------------------------ */

int ta_cache_stats_get(ta_cache_t *c, ta_cache_stats_t *out)
{
    if (!c || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    if (out->size < offsetof(ta_cache_stats_t, hits))
        return _ta_cache_fail(EINVAL,
                              "stats size %zu is less than %zu: set it to sizeof(ta_cache_stats_t)",
                              out->size, offsetof(ta_cache_stats_t, hits));
    size_t size = out->size;
    pthread_mutex_lock(&c->mu);
    ta_cache_stats_t s = c->st;
    s.in_cache = c->count;
    s.ram_used = c->ram_used;
    s.vram_used = c->vram_used;
    s.mapped_copied = atomic_load_explicit(&c->mapped_copied, memory_order_relaxed);
    s.budget_now = budget_now(c);
    s.ram_budget = c->cfg.ram_budget;
    if (s.loads) { /* the last load is the ring's newest record */
        const load_record_t *r = &c->recent[(s.loads - 1) % TA_CACHE_RECENT_LOADS];
        s.last_load_bytes = r->bytes;
        s.last_load_seconds = r->seconds;
        s.last_load_readers = (uint32_t)r->readers;
        s.last_load_direct = r->direct;
    }
    pthread_mutex_unlock(&c->mu);
    s.size = size;
    s.version = TA_CACHE_STATS_VERSION;
    memcpy(out, &s, size < sizeof s ? size : sizeof s);
    return 0;
}

static void json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

int ta_cache_stats_json(ta_cache_t *c, FILE *f)
{
    if (!c || !f)
        return _ta_cache_fail(EINVAL, "NULL argument");
    ta_cache_stats_t s = {.size = sizeof s};
    ta_cache_stats_get(c, &s);
    fprintf(
        f,
        "{\"hits\": %llu, \"misses\": %llu, \"high_watermark\": %llu, \"in_cache\": %llu, "
        "\"cleared\": %llu, \"cache_size\": %llu, \"ram_used\": %llu, \"vram_budget\": %llu, "
        "\"vram_used\": %llu, \"over_budget_admits\": %llu, \"loads\": %llu, "
        "\"load_bytes\": %llu, \"load_seconds\": %.6f, \"device_moves\": %llu, \"expired\": %llu, "
        "\"mapped_loads\": %llu, \"mapped_copied\": %llu, \"pressure_events\": %llu, "
        "\"pressure_evicted_bytes\": %llu, \"pressure_released_bytes\": %llu, "
        "\"budget_now\": %llu, \"loaded_model_sizes\": {",
        (unsigned long long)s.hits, (unsigned long long)s.misses,
        (unsigned long long)s.high_watermark, (unsigned long long)s.in_cache,
        (unsigned long long)s.cleared, (unsigned long long)s.ram_budget,
        (unsigned long long)s.ram_used, (unsigned long long)s.vram_budget,
        (unsigned long long)s.vram_used, (unsigned long long)s.over_budget_admits,
        (unsigned long long)s.loads, (unsigned long long)s.load_bytes, s.load_seconds,
        (unsigned long long)s.device_moves, (unsigned long long)s.expired,
        (unsigned long long)s.mapped_loads, (unsigned long long)s.mapped_copied,
        (unsigned long long)s.pressure_events, (unsigned long long)s.pressure_evicted_bytes,
        (unsigned long long)s.pressure_released_bytes, (unsigned long long)s.budget_now);
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < c->nsizes; i++) {
        if (i)
            fputs(", ", f);
        json_string(f, c->sizes[i].key);
        fprintf(f, ": %llu", (unsigned long long)c->sizes[i].bytes);
    }
    fputs("}, \"recent_loads\": [", f);
    uint64_t n = c->st.loads < TA_CACHE_RECENT_LOADS ? c->st.loads : TA_CACHE_RECENT_LOADS;
    for (uint64_t i = c->st.loads - n; i < c->st.loads; i++) {
        const load_record_t *r = &c->recent[i % TA_CACHE_RECENT_LOADS];
        fputs(i > c->st.loads - n ? ", {\"key\": " : "{\"key\": ", f);
        json_string(f, r->key);
        fprintf(f,
                ", \"bytes\": %llu, \"seconds\": %.6f, \"gbps\": %.3f, \"readers\": %d, "
                "\"direct\": %s}",
                (unsigned long long)r->bytes, r->seconds,
                r->seconds > 0 ? (double)r->bytes / r->seconds / 1e9 : 0.0, r->readers,
                r->direct ? "true" : "false");
    }
    pthread_mutex_unlock(&c->mu);
    fputs("]}\n", f);
    return ferror(f) ? EIO : 0;
}
