/* SPDX-License-Identifier: MIT */
/*
 * The model cache's device side: moves of entries to and from the device
 * and loads of safetensors files straight to it, through the CUDA staging
 * module (lib/cuda/, or cuda_none.c without CUDA). Budgets, the LRU list,
 * locks and the loads into RAM are the RAM side's (cache.c), whose helpers
 * this file calls through cache_internal.h; the RAM side calls back here
 * never (it frees device memory through the CUDA module itself).
 *
 * A move of an entry runs with the entry locked by the mover and no other
 * move of it in flight (move_begin); copies and device allocations happen
 * outside the cache mutex, charges and counters under it.
 */
#include "cache_internal.h"
#include "cuda/staging.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define PINNED_BUDGET ((size_t)256 << 20)

/* ---- device moves ----------------------------------------------------------------------- */

static size_t entry_bytes(const ta_entry_t *e)
{
    size_t n = 0;
    for (size_t i = 0; i < e->count; i++)
        n += e->tensors[i].nbytes;
    return n;
}

static int pool_ready(ta_cache_t *c)
{
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    if (!c->pool)
        rc = ta_pinned_pool_create(PINNED_BUDGET, &c->pool);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Moves of one entry run one at a time: a second mover waits for the
 * first, then finds the entry where the first left it. */
static void move_begin(ta_cache_t *c, ta_entry_t *e)
{
    pthread_mutex_lock(&c->mu);
    while (e->moving)
        pthread_cond_wait(&c->loaded, &c->mu);
    e->moving = true;
    pthread_mutex_unlock(&c->mu);
}

static int move_end(ta_cache_t *c, ta_entry_t *e, int rc)
{
    pthread_mutex_lock(&c->mu);
    e->moving = false;
    pthread_cond_broadcast(&c->loaded);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Frees the copy a move leaves behind (host is true for the host copy) if
 * the mover is the only holder; otherwise the other holders may be reading
 * it, and it goes when the last of them unlocks (still charged till then). */
static void release_old_copy(ta_cache_t *c, ta_entry_t *e, bool host)
{
    pthread_mutex_lock(&c->mu);
    if (host)
        e->drop_host = true;
    else
        e->drop_device = true;
    _ta_cache_drop_marked_and_unlock(c, e, 1);
}

static int move_to_device(ta_entry_t *e);

int ta_entry_to_device(ta_entry_t *e)
{
    if (!e || e->locks <= 0)
        return _ta_cache_fail(EINVAL, "the entry must be locked");
    ta_cache_t *c = e->cache;
    int rc = ta_cuda_init(c->cfg.device);
    if (rc)
        return _ta_cache_fail(rc, "no device: %s", ta_strerror(rc));
    move_begin(c, e);
    return move_end(c, e, move_to_device(e));
}

static void drop_device_reservation(ta_cache_t *c, ta_entry_t *e);

/* Charges need VRAM bytes to e, evicting device copies of unlocked
 * entries, and checks the device itself has room for them. */
static int reserve_vram(ta_cache_t *c, ta_entry_t *e, size_t need)
{
    int rc;
    victims_t v;
    do {
        v = (victims_t){0};
        pthread_mutex_lock(&c->mu);
        if (need > c->cfg.vram_budget && c->cfg.overflow == TA_OVERFLOW_REFUSE) {
            rc = _ta_cache_fail(TA_EBUDGET, "'%s' needs %zu bytes, more than the VRAM budget %zu",
                                e->key, need, c->cfg.vram_budget);
        } else {
            rc = _ta_cache_make_room_vram(c, need, &v);
            if (rc == TA_ECACHEFULL && c->cfg.overflow == TA_OVERFLOW_ADMIT) {
                c->st.over_budget_admits++;
                _ta_cache_log(c, TA_LOG_WARN, "'%s' admitted over the VRAM budget", e->key);
                rc = 0;
            } else if (rc == TA_ECACHEFULL) {
                rc = _ta_cache_fail(rc, "'%s' needs %zu VRAM bytes; the rest is locked", e->key,
                                    need);
            }
        }
        if (rc == 0) {
            c->vram_used += need;
            e->vram_bytes = need;
        }
        pthread_mutex_unlock(&c->mu);
        _ta_cache_victims_free(&v);
    } while (rc == EAGAIN);
    if (rc)
        return rc;
    /* after the evictions: is there room on the device itself? */
    size_t dev_free, dev_total;
    if ((rc = ta_cuda_mem_info(&dev_free, &dev_total)) != 0)
        rc = _ta_cache_fail(rc, "cudaMemGetInfo: %s", ta_strerror(rc));
    else if (dev_free < need || dev_free - need < c->cfg.device_working_mem)
        rc =
            _ta_cache_fail(ENOMEM, "the device has %zu bytes free; '%s' needs %zu plus %zu working",
                           dev_free, e->key, need, c->cfg.device_working_mem);
    if (rc)
        drop_device_reservation(c, e);
    return rc;
}

/* Device memory for t (t->dev NULL on failure). */
static int device_tensor(tensor_t *t)
{
    int rc = ta_cuda_device_alloc(t->nbytes ? t->nbytes : 1, &t->dev);
    if (rc) {
        t->dev = NULL;
        rc = _ta_cache_fail(rc, "device allocation of '%s': %s", t->name, ta_strerror(rc));
    }
    return rc;
}

/* Frees e's device copies and gives its VRAM charge back. */
static void drop_device_reservation(ta_cache_t *c, ta_entry_t *e)
{
    for (size_t i = 0; i < e->count; i++)
        if (e->tensors[i].dev) {
            ta_cuda_device_free(e->tensors[i].dev);
            e->tensors[i].dev = NULL;
        }
    pthread_mutex_lock(&c->mu);
    c->vram_used -= e->vram_bytes;
    e->vram_bytes = 0;
    pthread_mutex_unlock(&c->mu);
}

static int move_to_device(ta_entry_t *e)
{
    ta_cache_t *c = e->cache;
    int rc;
    if (e->vram_bytes > 0) { /* already there (perhaps moved by another holder) */
        pthread_mutex_lock(&c->mu);
        e->drop_device = false; /* wanted on the device after all */
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    if ((rc = pool_ready(c)) != 0)
        return _ta_cache_fail(rc, "pinned pool: %s", ta_strerror(rc));
    size_t need = entry_bytes(e);
    ta_memory_snapshot_t before;
    _ta_cache_snapshot_if_debug(c, &before);
    if ((rc = reserve_vram(c, e, need)) != 0)
        return rc;
    double t0 = _ta_os_now_s();
    for (size_t i = 0; i < e->count && rc == 0; i++) {
        tensor_t *t = &e->tensors[i];
        if ((rc = device_tensor(t)) == 0 &&
            (rc = ta_cuda_copy_to_device(c->pool, t->dev, t->data, t->nbytes)) != 0)
            rc = _ta_cache_fail(rc, "copy of '%s' to the device: %s", t->name, ta_strerror(rc));
    }
    if (rc) { /* undo: the entry stays on the host */
        drop_device_reservation(c, e);
        return rc;
    }
    if (!c->cfg.keep_ram_copy)
        release_old_copy(c, e, true);
    pthread_mutex_lock(&c->mu);
    c->st.device_moves++;
    pthread_mutex_unlock(&c->mu);
    _ta_cache_log(c, TA_LOG_INFO, "moved '%s' to device %d in %.2f s (%.3f GB)", e->key,
                  c->cfg.device, _ta_os_now_s() - t0, (double)need / 1e9);
    _ta_cache_log_snapshot_diff(c, &before);
    return 0;
}

static int move_to_host(ta_entry_t *e);

int ta_entry_to_host(ta_entry_t *e)
{
    if (!e || e->locks <= 0)
        return _ta_cache_fail(EINVAL, "the entry must be locked");
    move_begin(e->cache, e);
    return move_end(e->cache, e, move_to_host(e));
}

static int move_to_host(ta_entry_t *e)
{
    ta_cache_t *c = e->cache;
    if (e->vram_bytes == 0)
        return 0;
    if (e->ram_bytes) { /* the host copy was kept for other holders: keep it now */
        pthread_mutex_lock(&c->mu);
        e->drop_host = false;
        pthread_mutex_unlock(&c->mu);
    }
    int rc = pool_ready(c);
    if (rc)
        return _ta_cache_fail(rc, "pinned pool: %s", ta_strerror(rc));
    ta_memory_snapshot_t before;
    _ta_cache_snapshot_if_debug(c, &before);
    size_t need = e->ram_bytes ? 0 : entry_bytes(e);
    if (need) {
        if ((rc = _ta_cache_charge_entry(c, e, need, e->key, false)) != 0)
            return rc;
        for (size_t i = 0; i < e->count && rc == 0; i++) {
            tensor_t *t = &e->tensors[i];
            t->data = _ta_alloc_filled(t->nbytes ? t->nbytes : 1); /* the copy fills it */
            if (!t->data)
                rc = _ta_cache_fail(ENOMEM, "no memory for '%s'", t->name);
            else if ((rc = ta_cuda_copy_to_host(c->pool, t->data, t->dev, t->nbytes)) != 0)
                rc = _ta_cache_fail(rc, "copy of '%s' to the host: %s", t->name, ta_strerror(rc));
        }
        if (rc) {
            for (size_t i = 0; i < e->count; i++) {
                ta_free(e->tensors[i].data);
                e->tensors[i].data = NULL;
            }
            pthread_mutex_lock(&c->mu);
            c->ram_used -= need;
            e->ram_bytes = 0;
            pthread_mutex_unlock(&c->mu);
            return rc;
        }
    }
    release_old_copy(c, e, false);
    pthread_mutex_lock(&c->mu);
    c->st.device_moves++;
    pthread_mutex_unlock(&c->mu);
    _ta_cache_log(c, TA_LOG_INFO, "moved '%s' to the host", e->key);
    _ta_cache_log_snapshot_diff(c, &before);
    return 0;
}

/* ---- loads straight to the device ------------------------------------------ */

typedef struct {
    const char *path;
    int fd;
    _ta_loader_t loader; /* opened once for the whole stream */
    _ta_load_report_t rep;
    bool read_failed;
    char why[200];
} upload_reader_t;

/* One staging chunk of the file, read by the loader's readers. */
static int read_chunk(void *arg, void *buf, uint64_t off, size_t len)
{
    upload_reader_t *r = arg;
    _ta_span_t span = {buf, off, len};
    int rc = _ta_loader_read(&r->loader, &span, 1, &r->rep, r->why, sizeof r->why);
    r->read_failed = rc != 0;
    return rc;
}

/* The entry's tensors on the device, streamed from the file (e loading,
 * its tensors appended without host memory). */
static int stream_to_device(ta_cache_t *c, ta_entry_t *e, upload_reader_t *r,
                            const _ta_st_header_t *h, uint64_t total)
{
    int rc = reserve_vram(c, e, (size_t)total);
    if (rc)
        return rc;
    _ta_upload_t *spans = malloc((e->count ? e->count : 1) * sizeof *spans);
    if (!spans)
        rc = _ta_cache_fail(ENOMEM, "no memory for %zu tensors", e->count);
    for (size_t i = 0; i < e->count && rc == 0; i++)
        if ((rc = device_tensor(&e->tensors[i])) == 0)
            spans[i] = (_ta_upload_t){e->tensors[i].dev, h->data_start + h->tensors[i].begin,
                                      e->tensors[i].nbytes};
    /* a staging chunk: a few of the loader's chunks, one per reader (load_chunk is at most
     * TA_CACHE_MAX_LOAD_CHUNK: this cannot wrap) */
    size_t chunk = (c->cfg.load_chunk ? c->cfg.load_chunk : TA_LOAD_CHUNK) * 4;
    _ta_load_opts_t opts = _ta_cache_load_opts(c);
    _ta_loader_open(r->path, r->fd, &opts, &r->loader);
    if (rc == 0 && (rc = _ta_cuda_upload(c->pool, spans, e->count, chunk, read_chunk, r)) != 0)
        rc = r->read_failed
                 ? _ta_cache_fail(rc, "%s: %s", r->path, r->why)
                 : _ta_cache_fail(rc, "%s: upload to the device: %s", r->path, ta_strerror(rc));
    _ta_loader_close(&r->loader);
    free(spans);
    if (rc)
        drop_device_reservation(c, e);
    return rc;
}

int ta_cache_load_safetensors_to_device(ta_cache_t *c, const char *key, const char *path,
                                        ta_entry_t **out)
{
    if (!c || !key || !path || !out)
        return _ta_cache_fail(EINVAL, "NULL argument");
    if (c->cfg.keep_ram_copy) { /* the host copy stays: load it, then move it */
        int rc = ta_cache_load_safetensors(c, key, path, out);
        if (rc == 0 && (rc = ta_entry_to_device(*out)) != 0) {
            char why[256];
            snprintf(why, sizeof why, "%s", _ta_cache_last_message());
            ta_entry_unlock(*out);
            ta_cache_remove(c, key);
            *out = NULL;
            return _ta_cache_fail(rc, "%s", why);
        }
        return rc;
    }
    int rc = ta_cuda_init(c->cfg.device);
    if (rc)
        return _ta_cache_fail(rc, "no device: %s", ta_strerror(rc));
    if ((rc = pool_ready(c)) != 0)
        return _ta_cache_fail(rc, "pinned pool: %s", ta_strerror(rc));
    upload_reader_t r = {.path = path};
    _ta_st_header_t h;
    uint64_t total;
    if ((rc = _ta_cache_open_header(path, &r.fd, &h, &total)) != 0)
        return rc;
    ta_entry_t *e;
    if ((rc = _ta_cache_insert_reserved(c, key, 0, false, &e)) == 0) {
        double t0 = _ta_os_now_s();
        rc = _ta_cache_append_header_tensors(e, &h, path, NULL);
        if (rc == 0)
            rc = stream_to_device(c, e, &r, &h, total);
        if (rc) {
            _ta_cache_abandon_entry(c, e);
        } else {
            _ta_cache_publish(c, e, total, _ta_os_now_s() - t0, &r.rep);
            pthread_mutex_lock(&c->mu);
            c->st.device_moves++;
            pthread_mutex_unlock(&c->mu);
            _ta_cache_log(c, TA_LOG_INFO,
                          "loaded '%s' from %s to device %d: %zu tensors, %.3f GB in %.3f s", key,
                          path, c->cfg.device, e->count, (double)total / 1e9, _ta_os_now_s() - t0);
            *out = e;
        }
    }
    _ta_os_close(r.fd);
    _ta_st_free(&h);
    return rc;
}