/* SPDX-License-Identifier: MIT */
/*
 * _tensoralloc: the CPython extension under the tensoralloc package
 * (tools/python/tensoralloc/__init__.py builds the documented API on it).
 *
 * Why an extension and not ctypes: a view must keep its entry locked until
 * the view is garbage-collected. Here a view is a Buffer (the buffer
 * protocol over one tensor's memory) holding a reference to the Handle
 * that owns one lock of the entry; numpy and torch keep the Buffer alive
 * as their base, so the lock goes exactly when the last view does. ctypes
 * offers no object whose lifetime a numpy array extends that way.
 *
 * The GIL is released around every call into the cache: loads and moves run
 * while other Python threads do, and no call waits on the cache's mutex
 * while holding the GIL (the log callback takes the GIL with that mutex
 * held, so the other order would deadlock). Three consequences are kept
 * here: a call in flight keeps the C cache alive past close() (it is freed
 * by the last call or handle to go); a move to the device that gives up the
 * host copy runs under a second lock while views of the mover exist, so the
 * C cache keeps that copy until the views are gone; and the log callback
 * never waits for the GIL once the interpreter is exiting (an atexit
 * handler closes a gate, after which messages are dropped).
 *
 * Multi-phase initialisation (PEP 489) with heap types and module state:
 * the types and exceptions live in the module's state, not in globals.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "tensoralloc.h"
#include "tensoralloc_cache.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030A0000
#error "the tensoralloc extension needs Python 3.10 or later (heap types from module specs)"
#endif

/* Whether the interpreter is finalising, asked by the cache's threads
 * without the GIL. The atexit gate (below) is the guarantee: it closes
 * before finalisation begins and waits for the callbacks already past it.
 * This check only narrows what the gate cannot see: a module first imported
 * by an atexit handler, whose own handler Python never calls (handlers
 * registered while they run are skipped); a callback may still pass it just
 * before finalisation begins, as it could pass the private _Py_IsFinalizing
 * used before. Py_IsInitialized() is public, in the stable ABI and needs no
 * thread state: Py_FinalizeEx clears it right after marking the runtime
 * finalising, before it refuses the GIL to other threads (3.10 and later).
 * Py_IsFinalizing (3.13) says the same but is not in the limited API. */
#define interpreter_finalizing() (!Py_IsInitialized())

/* A function for a PyType_Slot (void *): through an integer, which ISO C
 * allows where a direct cast to an object pointer is not. */
#define SLOT_FN(f) ((void *)(uintptr_t)(f))

/* The log gate: closed at interpreter exit (atexit), after which no log
 * callback enters Python; calls counts the callbacks past it, which the exit
 * handler waits for. Read without the GIL, by threads the cache started, so
 * it is reference-counted: the module holds it and so does every Cache, and
 * it outlives whichever goes last. */
typedef struct {
    atomic_int closed, calls, refs;
} log_gate_t;

static log_gate_t *log_gate_ref(log_gate_t *g)
{
    if (g)
        atomic_fetch_add(&g->refs, 1);
    return g;
}

static void log_gate_unref(log_gate_t *g)
{
    if (g && atomic_fetch_sub(&g->refs, 1) == 1)
        free(g);
}

typedef struct {
    PyTypeObject *cache_type, *handle_type, *buffer_type;
    PyObject *format_error, *cache_full_error, *no_device_error;
    log_gate_t *log_gate;
} module_state;

static module_state *state_of(PyObject *o)
{
    return PyType_GetModuleState(Py_TYPE(o));
}

/* The message of this thread's last failed cache call. */
static const char *cache_error(void)
{
    const char *message;
    ta_cache_last_error(&message);
    return message;
}

/* Raises the exception rc calls for, with the cache's message. */
static PyObject *raise_rc(module_state *st, int rc, const char *message)
{
    char text[512];
    snprintf(text, sizeof text, "%s", message && *message ? message : ta_strerror(rc));
    switch (rc) {
    case TA_EFORMAT: PyErr_SetString(st->format_error, text); break;
    case TA_ECACHEFULL:
    case TA_EBUDGET: PyErr_SetString(st->cache_full_error, text); break;
    case TA_ENODEVICE:
    case TA_ENORUNTIME:
    case TA_ENOTSUP: PyErr_SetString(st->no_device_error, text); break;
    case ENOMEM: PyErr_SetString(PyExc_MemoryError, text); break;
    case EINVAL: PyErr_SetString(PyExc_ValueError, text); break;
    default:
        if (rc > 0 && rc < 1000) {
            PyObject *e = Py_BuildValue("(is)", rc, text);
            if (e) {
                PyErr_SetObject(PyExc_OSError, e); /* FileNotFoundError & co by errno */
                Py_DECREF(e);
            }
        } else {
            PyErr_SetString(PyExc_RuntimeError, text);
        }
    }
    return NULL;
}

/* ---- Cache ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD ta_cache_t *cache;
    module_state *st;
    log_gate_t *log_gate; /* the module's, for the callback (no GIL there) */
    PyObject *log;        /* callable(level: str, message: str) or NULL */
    PyObject *on_pressure; /* callable(event: dict) or NULL */
    Py_ssize_t handles;   /* live handles: each holds one lock of an entry */
    Py_ssize_t calls;     /* calls inside the C cache now, the GIL released */
    Py_ssize_t hold_hits; /* hits counted for the second locks of moves */
    int closed;
    int keep_ram_copy;
} CacheObject;

/* A callback from a thread of the library's (the log's, on_pressure's):
 * whether it may enter Python, counted until gate_leave. Counted before the
 * gate is read, and the exit handler closes the gate before it reads the
 * count (both sequentially consistent): either this call sees the gate
 * closed, or the handler waits for it. */
static bool gate_enter(log_gate_t *gate)
{
    atomic_fetch_add(&gate->calls, 1);
    return !atomic_load(&gate->closed) && !interpreter_finalizing();
}

static void gate_leave(log_gate_t *gate)
{
    atomic_fetch_sub(&gate->calls, 1);
}

/* Calls fn (a new reference is held: the callback may drop the cache's)
 * with args, the GIL held; failures are reported as unraisable. */
static void call_back(PyObject *fn, PyObject *args)
{
    Py_INCREF(fn);
    PyObject *r = args ? PyObject_CallObject(fn, args) : NULL;
    if (r)
        Py_DECREF(r);
    else
        PyErr_WriteUnraisable(fn);
    Py_XDECREF(args);
    Py_DECREF(fn);
}

static void log_to_python(void *arg, ta_log_level_t level, const char *message)
{
    static const char *const names[] = {"error", "warning", "info", "debug"};
    CacheObject *self = arg;
    if (gate_enter(self->log_gate)) {
        PyGILState_STATE g = PyGILState_Ensure();
        if (self->log)
            call_back(self->log, Py_BuildValue("(ss)", names[level], message));
        PyGILState_Release(g);
    }
    gate_leave(self->log_gate);
}

/* config.on_pressure: on the allocator's purge thread, after an eviction
 * for memory pressure; the same gate as the log's. */
static void pressure_to_python(const ta_cache_pressure_event_t *ev, void *arg)
{
    CacheObject *self = arg;
    if (gate_enter(self->log_gate)) {
        PyGILState_STATE g = PyGILState_Ensure();
        if (self->on_pressure)
            call_back(self->on_pressure,
                      Py_BuildValue("({s:I,s:s,s:K,s:K,s:K,s:K,s:K})", "sources",
                                    (unsigned)ev->sources, "figure", ev->figure, "released_bytes",
                                    (unsigned long long)ev->released_bytes, "evicted_bytes",
                                    (unsigned long long)ev->evicted_bytes, "evicted_entries",
                                    (unsigned long long)ev->evicted_entries, "ram_used",
                                    (unsigned long long)ev->ram_used, "budget",
                                    (unsigned long long)ev->budget));
        PyGILState_Release(g);
    }
    gate_leave(self->log_gate);
}

static void cache_destroy(CacheObject *self)
{
    ta_cache_t *c = self->cache;
    self->cache = NULL;
    if (c) {
        PyThreadState *ts = PyEval_SaveThread();
        ta_cache_destroy(c);
        PyEval_RestoreThread(ts);
    }
}

/* A call into the C cache begins: counted, so that close() leaves the cache
 * to the last call in flight (or handle) to free. Under the GIL; NULL with
 * ValueError once closed. */
static ta_cache_t *cache_enter(CacheObject *self)
{
    if (self->closed || !self->cache) {
        PyErr_SetString(PyExc_ValueError, "the cache is closed");
        return NULL;
    }
    self->calls++;
    return self->cache;
}

/* Frees the C cache when it is closed and nothing uses it any more. */
static void cache_free_if_unused(CacheObject *self)
{
    if (self->closed && self->calls == 0 && self->handles == 0)
        cache_destroy(self);
}

static void cache_leave(CacheObject *self)
{
    self->calls--;
    cache_free_if_unused(self);
}

static int Cache_init(CacheObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"ram_budget",    "vram_budget",    "device",         "keep_ram_copy",
                            "overflow",      "log",            "load_threads",   "page_cache",
                            "keep_alive_ms", "give_way",       "pressure_floor", "on_pressure",
                            NULL};
    unsigned long long ram = 0, vram = 0, keep_alive = 0, floor = 0;
    int device = 0, keep = 1, overflow = 0, threads = 0, page_cache = 0, give_way = 1;
    PyObject *log = Py_None, *on_pressure = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|KipiOiiKpKO", names, &ram, &vram, &device, &keep,
                                     &overflow, &log, &threads, &page_cache, &keep_alive,
                                     &give_way, &floor, &on_pressure))
        return -1;
    if (on_pressure != Py_None && !PyCallable_Check(on_pressure)) {
        PyErr_SetString(PyExc_TypeError, "on_pressure must be callable or None");
        return -1;
    }
    if (self->cache || self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    if (log != Py_None && !PyCallable_Check(log)) {
        PyErr_SetString(PyExc_TypeError, "log must be callable or None");
        return -1;
    }
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = (size_t)ram,
                             .vram_budget = (size_t)vram,
                             .device = device,
                             .keep_ram_copy = keep,
                             .overflow = (ta_overflow_t)overflow,
                             .log = log != Py_None ? log_to_python : NULL,
                             .log_arg = self,
                             .log_level = TA_LOG_DEBUG,
                             .load_threads = threads,
                             .page_cache = (ta_page_cache_t)page_cache,
                             .keep_alive_ms = keep_alive,
                             .pressure = give_way ? TA_CACHE_PRESSURE_GIVE_WAY
                                                  : TA_CACHE_PRESSURE_IGNORE,
                             .pressure_floor = (size_t)floor,
                             .on_pressure = on_pressure != Py_None ? pressure_to_python : NULL,
                             .on_pressure_arg = self};
    self->st = state_of((PyObject *)self);
    if (!self->log_gate)
        self->log_gate = log_gate_ref(self->st->log_gate);
    self->keep_ram_copy = keep;
    PyObject *old = self->log;
    self->log = log != Py_None ? Py_NewRef(log) : NULL;
    Py_XDECREF(old);
    old = self->on_pressure;
    self->on_pressure = on_pressure != Py_None ? Py_NewRef(on_pressure) : NULL;
    Py_XDECREF(old);
    ta_cache_t *c = NULL;
    /* Without the GIL: creation joins the allocator's pressure listeners,
     * whose lock a response holds while its callbacks wait for the GIL. */
    PyThreadState *ts = PyEval_SaveThread();
    int rc = ta_cache_create(&cfg, &c);
    PyEval_RestoreThread(ts);
    if (rc) {
        raise_rc(self->st, rc, cache_error());
        return -1;
    }
    self->cache = c;
    return 0;
}

static int Cache_traverse(CacheObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE((PyObject *)self));
    Py_VISIT(self->log);
    Py_VISIT(self->on_pressure);
    return 0;
}

static int Cache_clear(CacheObject *self)
{
    Py_CLEAR(self->log);
    Py_CLEAR(self->on_pressure);
    return 0;
}

static void Cache_dealloc(CacheObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    PyObject_GC_UnTrack(self);
    cache_destroy(self); /* no call is in flight: each holds a reference */
    log_gate_unref(self->log_gate);
    Py_CLEAR(self->log);
    Py_CLEAR(self->on_pressure);
    PyObject_GC_Del(self); /* the type's tp_free: a GC type that takes no subclasses */
    Py_DECREF(tp);
}

/* ---- Handle: one lock of an entry -------------------------------------------- */

typedef struct {
    PyObject_HEAD CacheObject *owner;
    ta_entry_t *entry;
    Py_ssize_t views; /* live Buffers over this handle's host pointers */
    int moving;       /* moves through this handle in flight */
    bool host_kept;   /* moved to the device; the host copy kept only for the views */
} HandleObject;

/* A handle for e, locked by the caller; unlocks e when it fails. */
static PyObject *handle_new(CacheObject *owner, ta_entry_t *e)
{
    HandleObject *h = PyObject_New(HandleObject, owner->st->handle_type);
    if (!h) {
        PyThreadState *ts = PyEval_SaveThread();
        ta_entry_unlock(e);
        PyEval_RestoreThread(ts);
        return NULL;
    }
    h->owner = (CacheObject *)Py_NewRef((PyObject *)owner);
    h->entry = e;
    h->views = 0;
    h->moving = 0;
    h->host_kept = false;
    owner->handles++;
    return (PyObject *)h;
}

static void Handle_dealloc(HandleObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    CacheObject *owner = self->owner;
    ta_entry_t *e = self->entry;
    PyThreadState *ts = PyEval_SaveThread();
    ta_entry_unlock(e);
    PyEval_RestoreThread(ts);
    owner->handles--;
    cache_free_if_unused(owner); /* close() waited for the last view */
    Py_DECREF(owner);
    PyObject_Free(self);
    Py_DECREF(tp);
}

/* ---- Cache methods ---------------------------------------------------------------- */

static PyObject *Cache_load(CacheObject *self, PyObject *args)
{
    const char *key, *path;
    int to_device = 0;
    if (!PyArg_ParseTuple(args, "ss|p", &key, &path, &to_device))
        return NULL;
    ta_cache_t *c = cache_enter(self);
    if (!c)
        return NULL;
    ta_entry_t *e = NULL;
    int rc;
    char why[512];
    PyThreadState *ts = PyEval_SaveThread();
    for (;;) {
        rc = ta_cache_get(c, key, &e);
        if (rc != ENOENT)
            break;
        rc = to_device ? ta_cache_load_safetensors_to_device(c, key, path, &e)
                       : ta_cache_load_safetensors(c, key, path, &e);
        if (rc != EEXIST) /* EEXIST: another thread loaded it meanwhile */
            break;
    }
    snprintf(why, sizeof why, "%s", rc ? cache_error() : "");
    PyEval_RestoreThread(ts);
    PyObject *out = rc ? raise_rc(self->st, rc, why) : handle_new(self, e);
    cache_leave(self); /* after the handle: a locked entry keeps the cache */
    return out;
}

static PyObject *Cache_get(CacheObject *self, PyObject *args)
{
    const char *key;
    if (!PyArg_ParseTuple(args, "s", &key))
        return NULL;
    ta_cache_t *c = cache_enter(self);
    if (!c)
        return NULL;
    ta_entry_t *e = NULL;
    int rc;
    char why[512];
    PyThreadState *ts = PyEval_SaveThread();
    rc = ta_cache_get(c, key, &e);
    snprintf(why, sizeof why, "%s", rc ? cache_error() : "");
    PyEval_RestoreThread(ts);
    PyObject *out = rc == ENOENT ? Py_NewRef(Py_None)
                    : rc         ? raise_rc(self->st, rc, why)
                                 : handle_new(self, e);
    cache_leave(self);
    return out;
}

static PyObject *Cache_remove(CacheObject *self, PyObject *args)
{
    const char *key;
    if (!PyArg_ParseTuple(args, "s", &key))
        return NULL;
    ta_cache_t *c = cache_enter(self);
    if (!c)
        return NULL;
    int rc;
    char why[512];
    PyThreadState *ts = PyEval_SaveThread();
    rc = ta_cache_remove(c, key);
    snprintf(why, sizeof why, "%s", rc ? cache_error() : "");
    PyEval_RestoreThread(ts);
    cache_leave(self);
    if (rc == ENOENT) {
        PyErr_SetString(PyExc_KeyError, key);
        return NULL;
    }
    if (rc == EBUSY) {
        PyErr_Format(PyExc_RuntimeError, "%s (close it and drop its views first)", why);
        return NULL;
    }
    if (rc)
        return raise_rc(self->st, rc, why);
    Py_RETURN_NONE;
}

static PyObject *Cache_contains(CacheObject *self, PyObject *args)
{
    const char *key;
    if (!PyArg_ParseTuple(args, "s", &key))
        return NULL;
    ta_cache_t *c = cache_enter(self);
    if (!c)
        return NULL;
    PyThreadState *ts = PyEval_SaveThread();
    bool found = ta_cache_contains(c, key);
    PyEval_RestoreThread(ts);
    cache_leave(self);
    return PyBool_FromLong(found);
}

static PyObject *Cache_keys(CacheObject *self, PyObject *noargs)
{
    (void)noargs;
    ta_cache_t *c = cache_enter(self);
    if (!c)
        return NULL;
    char **keys = NULL;
    size_t n = 0;
    char why[512];
    PyThreadState *ts = PyEval_SaveThread();
    int rc = ta_cache_keys(c, &keys, &n);
    snprintf(why, sizeof why, "%s", rc ? cache_error() : "");
    PyEval_RestoreThread(ts);
    cache_leave(self);
    if (rc)
        return raise_rc(self->st, rc, why);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *k = PyUnicode_FromString(keys[i]);
        if (!k || PyList_SetItem(list, (Py_ssize_t)i, k) < 0) /* takes k */
            Py_CLEAR(list);
    }
    ta_cache_keys_free(keys);
    return list;
}

static PyObject *Cache_stats_json(CacheObject *self, PyObject *noargs)
{
    (void)noargs;
    ta_cache_t *c = cache_enter(self);
    if (!c)
        return NULL;
    char *text = NULL;
    size_t len = 0;
    int rc = ENOMEM;
    PyThreadState *ts = PyEval_SaveThread();
    FILE *f = open_memstream(&text, &len);
    if (f) {
        rc = ta_cache_stats_json(c, f);
        fclose(f);
    }
    PyEval_RestoreThread(ts);
    cache_leave(self);
    PyObject *out =
        rc == 0 ? PyUnicode_FromStringAndSize(text, (Py_ssize_t)len) : raise_rc(self->st, rc, NULL);
    free(text);
    return out;
}

static PyObject *Cache_close(CacheObject *self, PyObject *noargs)
{
    (void)noargs;
    self->closed = 1;
    cache_free_if_unused(self); /* else the last call or handle to go frees it */
    Py_RETURN_NONE;
}

static PyObject *Cache_get_closed(CacheObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->closed);
}

enum { COUNT_HANDLES, COUNT_CALLS, COUNT_HOLD_HITS };

/* handles, calls and hold_hits: which is the getset closure. */
static PyObject *Cache_get_count(CacheObject *self, void *which)
{
    switch ((uintptr_t)which) {
    case COUNT_HANDLES: return PyLong_FromSsize_t(self->handles);
    case COUNT_CALLS: return PyLong_FromSsize_t(self->calls);
    default: return PyLong_FromSsize_t(self->hold_hits);
    }
}

static PyMethodDef Cache_methods[] = {
    {"load", (PyCFunction)Cache_load, METH_VARARGS,
     "load(key, path, to_device=False) -> handle: the cached entry, or the file loaded"},
    {"get", (PyCFunction)Cache_get, METH_VARARGS, "get(key) -> handle or None"},
    {"remove", (PyCFunction)Cache_remove, METH_VARARGS, "remove(key)"},
    {"contains", (PyCFunction)Cache_contains, METH_VARARGS, "contains(key) -> bool"},
    {"keys", (PyCFunction)Cache_keys, METH_NOARGS, "keys, least recently used first"},
    {"stats_json", (PyCFunction)Cache_stats_json, METH_NOARGS, "ta_cache_stats_json as text"},
    {"close", (PyCFunction)Cache_close, METH_NOARGS,
     "close: no calls after it; the memory goes when the last call in flight and the last "
     "handle do"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Cache_getset[] = {
    {"closed", (getter)Cache_get_closed, NULL, NULL, NULL},
    {"handles", (getter)Cache_get_count, NULL, "live handles", (void *)(uintptr_t)COUNT_HANDLES},
    {"calls", (getter)Cache_get_count, NULL, "calls in flight", (void *)(uintptr_t)COUNT_CALLS},
    {"hold_hits", (getter)Cache_get_count, NULL,
     "hits the cache counted for the extension's own second locks (moves under views)",
     (void *)(uintptr_t)COUNT_HOLD_HITS},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot cache_slots[] = {
    {Py_tp_new, SLOT_FN(PyType_GenericNew)},
    {Py_tp_init, SLOT_FN(Cache_init)},
    {Py_tp_dealloc, SLOT_FN(Cache_dealloc)},
    {Py_tp_traverse, SLOT_FN(Cache_traverse)},
    {Py_tp_clear, SLOT_FN(Cache_clear)},
    {Py_tp_methods, Cache_methods},
    {Py_tp_getset, Cache_getset},
    {Py_tp_doc, "Cache(ram_budget, vram_budget=0, device=0, keep_ram_copy=True, overflow=0, "
                "log=None, load_threads=0, page_cache=0, keep_alive_ms=0, give_way=True, "
                "pressure_floor=0, on_pressure=None): a ta_cache_t"},
    {0, NULL}};

static PyType_Spec cache_spec = {.name = "tensoralloc._tensoralloc.Cache",
                                 .basicsize = sizeof(CacheObject),
                                 .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
                                 .slots = cache_slots};

/* ---- Buffer: one tensor's memory, for numpy and torch ------------------------------ */

typedef struct {
    PyObject_HEAD HandleObject *handle;
    void *data;
    Py_ssize_t len;
} BufferObject;

static int Buffer_getbuffer(BufferObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->len, 0, flags);
}

static void Buffer_dealloc(BufferObject *self)
{
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    HandleObject *h = self->handle;
    if (h) {
        h->views--;
        Py_DECREF(h);
    }
    PyObject_Free(self);
    Py_DECREF(tp);
}

static PyType_Slot buffer_slots[] = {
    {Py_tp_dealloc, SLOT_FN(Buffer_dealloc)},
    {Py_bf_getbuffer, SLOT_FN(Buffer_getbuffer)},
    {Py_tp_doc, "a tensor's host memory; keeps its entry locked while it lives"},
    {0, NULL}};

static PyType_Spec buffer_spec = {.name = "tensoralloc._tensoralloc.Buffer",
                                  .basicsize = sizeof(BufferObject),
                                  .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
                                  .slots = buffer_slots};

/* ---- Handle methods ------------------------------------------------------------------ */

static int handle_tensor(HandleObject *self, PyObject *args, ta_tensor_t *t)
{
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "n", &i))
        return -1;
    if (i < 0 || ta_entry_tensor_at(self->entry, (size_t)i, t) != 0) {
        PyErr_SetString(PyExc_IndexError, "no such tensor");
        return -1;
    }
    return 0;
}

static PyObject *Handle_info(HandleObject *self, PyObject *args)
{
    ta_tensor_t t;
    if (handle_tensor(self, args, &t))
        return NULL;
    PyObject *shape = PyTuple_New(t.ndim);
    for (int d = 0; shape && d < t.ndim; d++) {
        PyObject *n = PyLong_FromLongLong(t.shape[d]);
        if (!n || PyTuple_SetItem(shape, d, n) < 0) /* takes n */
            Py_CLEAR(shape);
    }
    if (!shape)
        return NULL;
    return Py_BuildValue("(ssNnOO)", t.name, ta_dtype_name(t.dtype), shape, (Py_ssize_t)t.nbytes,
                         t.data ? Py_True : Py_False, t.device_data ? Py_True : Py_False);
}

static PyObject *Handle_buffer(HandleObject *self, PyObject *args)
{
    ta_tensor_t t;
    if (handle_tensor(self, args, &t))
        return NULL;
    if (self->moving) { /* the pointer may be given up by the move in flight */
        PyErr_Format(PyExc_ValueError,
                     "tensor '%s' is being moved: take views before or after the move", t.name);
        return NULL;
    }
    if (!t.data || self->host_kept) {
        PyErr_Format(PyExc_ValueError,
                     "tensor '%s' is on the device only: to_host() first for a host view", t.name);
        return NULL;
    }
    BufferObject *b = PyObject_New(BufferObject, state_of((PyObject *)self)->buffer_type);
    if (!b)
        return NULL;
    b->handle = (HandleObject *)Py_NewRef((PyObject *)self);
    b->data = t.data;
    b->len = (Py_ssize_t)t.nbytes;
    self->views++;
    return (PyObject *)b;
}

static PyObject *Handle_device_pointer(HandleObject *self, PyObject *args)
{
    ta_tensor_t t;
    if (handle_tensor(self, args, &t))
        return NULL;
    return PyLong_FromVoidPtr(t.device_data);
}

static PyObject *handle_move(HandleObject *self, bool to_device)
{
    CacheObject *owner = self->owner;
    ta_cache_t *c = cache_enter(owner);
    if (!c)
        return NULL;
    /* A move to the device without keep_ram_copy gives the host copy up, and
     * the C cache frees it at once when the mover is the entry's only holder
     * -- under this handle's views. With views, the move runs under a second
     * lock: the cache then keeps the copy (charged) for the other holder,
     * and it goes when the last lock does, this handle's, which every view
     * holds. */
    bool hold = to_device && !owner->keep_ram_copy && self->views > 0;
    ta_entry_t *e = self->entry, *second = NULL;
    int rc = 0;
    char why[512] = "";
    self->moving++;
    PyThreadState *ts = PyEval_SaveThread();
    if (hold && (rc = ta_cache_get(c, ta_entry_key(e), &second)) == 0 && second != e) {
        ta_entry_unlock(second); /* cannot be: e is locked, so its key is e's */
        second = NULL;
        rc = EAGAIN;
    }
    if (rc == 0)
        rc = to_device ? ta_entry_to_device(e) : ta_entry_to_host(e);
    if (rc)
        snprintf(why, sizeof why, "%s", cache_error());
    if (second)
        ta_entry_unlock(second);
    PyEval_RestoreThread(ts);
    self->moving--;
    if (second)
        owner->hold_hits++;
    if (rc == 0 && hold)
        self->host_kept = true;
    else if (rc == 0 && !to_device)
        self->host_kept = false;
    cache_leave(owner);
    if (rc)
        return raise_rc(owner->st, rc, why);
    Py_RETURN_NONE;
}

static PyObject *Handle_to_device(HandleObject *self, PyObject *noargs)
{
    (void)noargs;
    return handle_move(self, true);
}

static PyObject *Handle_to_host(HandleObject *self, PyObject *noargs)
{
    (void)noargs;
    return handle_move(self, false);
}

static PyObject *Handle_get_key(HandleObject *self, void *unused)
{
    (void)unused;
    return PyUnicode_FromString(ta_entry_key(self->entry));
}

enum { SIZE_COUNT, SIZE_RAM, SIZE_VRAM, SIZE_VIEWS };

/* count, ram_bytes, vram_bytes and views: which is the getset closure. */
static PyObject *Handle_get_size(HandleObject *self, void *which)
{
    switch ((uintptr_t)which) {
    case SIZE_COUNT: return PyLong_FromSize_t(ta_entry_tensor_count(self->entry));
    case SIZE_RAM: return PyLong_FromSize_t(ta_entry_ram_bytes(self->entry));
    case SIZE_VRAM: return PyLong_FromSize_t(ta_entry_vram_bytes(self->entry));
    default: return PyLong_FromSsize_t(self->views);
    }
}

static PyMethodDef Handle_methods[] = {
    {"info", (PyCFunction)Handle_info, METH_VARARGS,
     "info(i) -> (name, dtype, shape, nbytes, on_host, on_device)"},
    {"buffer", (PyCFunction)Handle_buffer, METH_VARARGS,
     "buffer(i) -> Buffer over tensor i's host memory"},
    {"device_pointer", (PyCFunction)Handle_device_pointer, METH_VARARGS,
     "device_pointer(i) -> int (0: not on the device)"},
    {"to_device", (PyCFunction)Handle_to_device, METH_NOARGS,
     "ta_entry_to_device; a host copy under live views stays until they go"},
    {"to_host", (PyCFunction)Handle_to_host, METH_NOARGS, "ta_entry_to_host"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Handle_getset[] = {
    {"key", (getter)Handle_get_key, NULL, NULL, NULL},
    {"count", (getter)Handle_get_size, NULL, NULL, (void *)(uintptr_t)SIZE_COUNT},
    {"ram_bytes", (getter)Handle_get_size, NULL, NULL, (void *)(uintptr_t)SIZE_RAM},
    {"vram_bytes", (getter)Handle_get_size, NULL, NULL, (void *)(uintptr_t)SIZE_VRAM},
    {"views", (getter)Handle_get_size, NULL, "live Buffers", (void *)(uintptr_t)SIZE_VIEWS},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot handle_slots[] = {
    {Py_tp_dealloc, SLOT_FN(Handle_dealloc)},
    {Py_tp_methods, Handle_methods},
    {Py_tp_getset, Handle_getset},
    {Py_tp_doc, "one lock of a cache entry, released when the handle is collected"},
    {0, NULL}};

static PyType_Spec handle_spec = {.name = "tensoralloc._tensoralloc.Handle",
                                  .basicsize = sizeof(HandleObject),
                                  .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
                                  .slots = handle_slots};

/* ---- module functions ------------------------------------------------------------------ */

static PyObject *mod_mallinfo2(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    struct mallinfo2 mi = ta_mallinfo2();
    return Py_BuildValue("{snsnsnsnsnsnsnsnsnsn}", "arena", (Py_ssize_t)mi.arena, "ordblks",
                         (Py_ssize_t)mi.ordblks, "smblks", (Py_ssize_t)mi.smblks, "hblks",
                         (Py_ssize_t)mi.hblks, "hblkhd", (Py_ssize_t)mi.hblkhd, "usmblks",
                         (Py_ssize_t)mi.usmblks, "fsmblks", (Py_ssize_t)mi.fsmblks, "uordblks",
                         (Py_ssize_t)mi.uordblks, "fordblks", (Py_ssize_t)mi.fordblks, "keepcost",
                         (Py_ssize_t)mi.keepcost);
}

/* ta_stats_t as a dict, its names from the library's own field table. */
static PyObject *mod_stats(PyObject *m, PyObject *noargs)
{
    (void)noargs;
    ta_stats_t st = {.size = sizeof st};
    int rc = ta_stats_get(&st);
    if (rc)
        return raise_rc(PyModule_GetState(m), rc, NULL);
    PyObject *d = Py_BuildValue("{sI}", "version", st.version);
    const char *name;
    uint64_t value;
    for (size_t i = 0; d && ta_stats_field(&st, i, &name, NULL, &value) == 0; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(value);
        if (!v || PyDict_SetItemString(d, name, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

static PyObject *mod_trim(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    PyThreadState *ts = PyEval_SaveThread();
    ta_trim();
    PyEval_RestoreThread(ts);
    Py_RETURN_NONE;
}

/* ta_pressure_signal: the response to memory pressure, now, the GIL
 * released (a cache's on_pressure callback takes it). */
static PyObject *mod_pressure_signal(PyObject *m, PyObject *noargs)
{
    (void)m;
    (void)noargs;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = ta_pressure_signal();
    PyEval_RestoreThread(ts);
    if (rc)
        return PyErr_Format(PyExc_RuntimeError, "ta_pressure_signal: %s", ta_strerror(rc));
    Py_RETURN_NONE;
}

static PyObject *mod_snapshot(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    ta_memory_snapshot_t s;
    PyThreadState *ts = PyEval_SaveThread();
    ta_memory_snapshot(&s);
    PyEval_RestoreThread(ts);
    return Py_BuildValue("(KKKKKKK)", s.rss, s.mapped, s.small_used, s.small_free,
                         s.total_allocated, s.total_used, s.vram);
}

static int snapshot_arg(PyObject *t, ta_memory_snapshot_t *s)
{
    return PyArg_ParseTuple(t, "KKKKKKK", &s->rss, &s->mapped, &s->small_used, &s->small_free,
                            &s->total_allocated, &s->total_used, &s->vram);
}

static PyObject *mod_snapshot_diff(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *a, *b;
    ta_memory_snapshot_t sa, sb;
    if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &a, &PyTuple_Type, &b) ||
        !snapshot_arg(a, &sa) || !snapshot_arg(b, &sb))
        return NULL;
    char buf[2048];
    int n = ta_memory_snapshot_diff(&sa, &sb, buf, sizeof buf);
    return PyUnicode_FromStringAndSize(buf, n < 0                 ? 0
                                            : n < (int)sizeof buf ? n
                                                                  : (int)sizeof buf - 1);
}

static PyObject *mod_budget_rule(PyObject *m, PyObject *args)
{
    (void)m;
    unsigned long long memory = 0, vram = 0, working = 0;
    if (!PyArg_ParseTuple(args, "|KKK", &memory, &vram, &working))
        return NULL;
    return PyLong_FromSize_t(ta_cache_budget_rule((size_t)memory, (size_t)vram, (size_t)working));
}

/* Registered with atexit, so it runs before the interpreter starts to
 * finalise: from then on a log callback (the keep-alive timer's, or one
 * from a daemon thread's load) must not wait for the GIL -- a thread that
 * takes it during finalisation is ended where it stands, the cache's mutex
 * held, and the cache's destruction would wait on that mutex for ever.
 * Closes the gate, then lets the callbacks already past it finish. */
static PyObject *mod_close_log_gate(PyObject *m, PyObject *noargs)
{
    (void)noargs;
    log_gate_t *gate = ((module_state *)PyModule_GetState(m))->log_gate;
    atomic_store(&gate->closed, 1);
    while (atomic_load(&gate->calls) > 0) {
        PyThreadState *ts = PyEval_SaveThread();
        usleep(1000);
        PyEval_RestoreThread(ts);
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"mallinfo2", mod_mallinfo2, METH_NOARGS, "ta_mallinfo2 as a dict"},
    {"stats", mod_stats, METH_NOARGS, "ta_stats_get as a dict (names from ta_stats_field)"},
    {"trim", mod_trim, METH_NOARGS, "ta_trim"},
    {"pressure_signal", mod_pressure_signal, METH_NOARGS, "ta_pressure_signal"},
    {"snapshot", mod_snapshot, METH_NOARGS, "ta_memory_snapshot as a tuple"},
    {"snapshot_diff", mod_snapshot_diff, METH_VARARGS, "ta_memory_snapshot_diff of two tuples"},
    {"budget_rule", mod_budget_rule, METH_VARARGS, "ta_cache_budget_rule(memory, vram, working)"},
    {"_close_log_gate", mod_close_log_gate, METH_NOARGS,
     "at exit (atexit): log messages are dropped from now on"},
    {NULL, NULL, 0, NULL}};

/* ---- the module: multi-phase initialisation ---------------------------------------------- */

static int add_exception(PyObject *m, PyObject **slot, const char *name, PyObject *base,
                         const char *doc)
{
    *slot = PyErr_NewExceptionWithDoc(name, doc, base, NULL);
    return *slot ? PyModule_AddObjectRef(m, strrchr(name, '.') + 1, *slot) : -1;
}

static int add_type(PyObject *m, PyTypeObject **slot, PyType_Spec *spec)
{
    *slot = (PyTypeObject *)PyType_FromModuleAndSpec(m, spec, NULL);
    return *slot ? PyModule_AddType(m, *slot) : -1;
}

/* ---- the C enums' names: each fact once ------------------------------------------------- */

/* The binding of ta_page_cache_t and ta_overflow_t: the library names its
 * modes by value only, so their Python names are given here, in enum order,
 * and nowhere else (the package checks its arguments against the module's
 * PAGE_CACHE_MODES and OVERFLOW_MODES). */
static const char *const page_cache_names[] = {[TA_PAGE_CACHE_KEEP] = "keep",
                                               [TA_PAGE_CACHE_DROP] = "drop",
                                               [TA_PAGE_CACHE_BYPASS] = "bypass",
                                               [TA_PAGE_CACHE_MAP] = "map"};
_Static_assert(sizeof page_cache_names / sizeof *page_cache_names == TA_PAGE_CACHE_COUNT_,
               "a name for every ta_page_cache_t");
static const char *const overflow_names[] = {
    [TA_OVERFLOW_REFUSE] = "refuse", [TA_OVERFLOW_ADMIT] = "admit"};

/* Adds a read-only mapping (types.MappingProxyType) over d, then drops d. */
static int add_mapping(PyObject *m, const char *name, PyObject *d)
{
    PyObject *proxy = d ? PyDictProxy_New(d) : NULL;
    int rc = proxy ? PyModule_AddObjectRef(m, name, proxy) : -1;
    Py_XDECREF(proxy);
    Py_XDECREF(d);
    return rc;
}

/* name -> its index in names: the enum's value. */
static int add_enum_names(PyObject *m, const char *name, const char *const *names, size_t n)
{
    PyObject *d = PyDict_New();
    for (size_t i = 0; d && i < n; i++) {
        PyObject *v = PyLong_FromSize_t(i);
        if (!v || PyDict_SetItemString(d, names[i], v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return add_mapping(m, name, d);
}

/* DTYPE_SIZES: safetensors dtype name -> bytes per element, from the
 * library's own table (ta_dtype_name, ta_dtype_size), asked value by value
 * until it knows no more: a newer library's dtypes come with it. */
static int add_dtype_sizes(PyObject *m)
{
    PyObject *d = PyDict_New();
    for (int i = 0; d && ta_dtype_size((ta_dtype_t)i) > 0; i++) {
        PyObject *v = PyLong_FromSize_t(ta_dtype_size((ta_dtype_t)i));
        if (!v || PyDict_SetItemString(d, ta_dtype_name((ta_dtype_t)i), v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return add_mapping(m, "DTYPE_SIZES", d);
}

static int register_exit_handler(PyObject *m)
{
    PyObject *atexit = PyImport_ImportModule("atexit");
    if (!atexit)
        return -1;
    PyObject *gate = PyObject_GetAttrString(m, "_close_log_gate");
    PyObject *r = gate ? PyObject_CallMethod(atexit, "register", "O", gate) : NULL;
    Py_XDECREF(r);
    Py_XDECREF(gate);
    Py_DECREF(atexit);
    return r ? 0 : -1;
}

static int module_exec(PyObject *m)
{
    /* The main interpreter only: the log callback takes the GIL with
     * PyGILState_Ensure, which knows that interpreter alone. Checked here,
     * not declared with the Py_mod_multiple_interpreters slot, which the
     * stable ABI of 3.11 lacks (3.11 refuses a slot it does not know); the
     * main interpreter's ID is 0. */
    if (PyInterpreterState_GetID(PyInterpreterState_Get()) != 0) {
        PyErr_SetString(PyExc_ImportError, "tensoralloc works in the main interpreter only (its "
                                           "log callback takes the GIL with PyGILState_Ensure)");
        return -1;
    }
    module_state *st = PyModule_GetState(m);
    st->log_gate = calloc(1, sizeof *st->log_gate);
    if (!st->log_gate) {
        PyErr_NoMemory();
        return -1;
    }
    atomic_init(&st->log_gate->refs, 1);
    if (add_type(m, &st->cache_type, &cache_spec) < 0 ||
        add_type(m, &st->handle_type, &handle_spec) < 0 ||
        add_type(m, &st->buffer_type, &buffer_spec) < 0 ||
        add_exception(m, &st->format_error, "tensoralloc.FormatError", PyExc_ValueError,
                      "a malformed file; the message is the loader's") < 0 ||
        add_exception(m, &st->cache_full_error, "tensoralloc.CacheFullError", PyExc_MemoryError,
                      "the budget cannot be met") < 0 ||
        add_exception(m, &st->no_device_error, "tensoralloc.NoDeviceError", PyExc_RuntimeError,
                      "no GPU, or no CUDA runtime") < 0 ||
        PyModule_AddStringConstant(m, "library_version", ta_version()) < 0 ||
        add_dtype_sizes(m) < 0 ||
        add_enum_names(m, "PAGE_CACHE_MODES", page_cache_names,
                       sizeof page_cache_names / sizeof *page_cache_names) < 0 ||
        add_enum_names(m, "OVERFLOW_MODES", overflow_names,
                       sizeof overflow_names / sizeof *overflow_names) < 0)
        return -1;
    return register_exit_handler(m);
}

static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = PyModule_GetState(m);
    if (!st)
        return 0;
    Py_VISIT(st->cache_type);
    Py_VISIT(st->handle_type);
    Py_VISIT(st->buffer_type);
    Py_VISIT(st->format_error);
    Py_VISIT(st->cache_full_error);
    Py_VISIT(st->no_device_error);
    return 0;
}

static int module_clear(PyObject *m)
{
    module_state *st = PyModule_GetState(m);
    if (!st)
        return 0;
    Py_CLEAR(st->cache_type);
    Py_CLEAR(st->handle_type);
    Py_CLEAR(st->buffer_type);
    Py_CLEAR(st->format_error);
    Py_CLEAR(st->cache_full_error);
    Py_CLEAR(st->no_device_error);
    return 0;
}

static void module_free(void *m)
{
    module_clear(m);
    module_state *st = PyModule_GetState(m);
    if (st) {
        log_gate_unref(st->log_gate);
        st->log_gate = NULL;
    }
}

/* module_exec refuses every interpreter but the main one. */
static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, SLOT_FN(module_exec)}, {0, NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                                        .m_name = "_tensoralloc",
                                        .m_doc = "tensoralloc's model cache and statistics",
                                        .m_size = sizeof(module_state),
                                        .m_methods = module_methods,
                                        .m_slots = module_slots,
                                        .m_traverse = module_traverse,
                                        .m_clear = module_clear,
                                        .m_free = module_free};

PyMODINIT_FUNC PyInit__tensoralloc(void);
PyMODINIT_FUNC PyInit__tensoralloc(void)
{
    return PyModuleDef_Init(&module_def);
}
