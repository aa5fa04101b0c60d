/* SPDX-License-Identifier: MIT */
/*
 * _tensoralloc: the CPython extension under the tensoralloc package
 * (tools/python/tensoralloc/__init__.py builds the documented API on it).
 *
 * Why an extension and not ctypes: a view must keep its entry locked until
 * the view is garbage-collected. Here a view is a _Buffer (the buffer
 * protocol over one tensor's memory) holding a reference to the _Handle
 * that owns one lock of the entry; numpy and torch keep the _Buffer alive
 * as their base, so the lock goes exactly when the last view does. ctypes
 * offers no object whose lifetime a numpy array extends that way.
 *
 * The GIL is released around every call into the cache: loads and moves run
 * while other Python threads do, and no call waits on the cache's mutex
 * while holding the GIL (the log callback takes the GIL with that mutex
 * held, so the other order would deadlock).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "tensoralloc.h"
#include "tensoralloc_cache.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static PyObject *FormatError, *CacheFullError, *NoDeviceError;

/* The message of this thread's last failed cache call. */
static const char *cache_error(void)
{
    const char *message;
    ta_cache_last_error(&message);
    return message;
}

/* Raises the exception rc calls for, with the cache's message. */
static PyObject *raise_rc(int rc, const char *message)
{
    char text[512];
    snprintf(text, sizeof text, "%s", message && *message ? message : ta_strerror(rc));
    switch (rc) {
    case TA_EFORMAT: PyErr_SetString(FormatError, text); break;
    case TA_ECACHEFULL:
    case TA_EBUDGET: PyErr_SetString(CacheFullError, text); break;
    case TA_ENODEVICE:
    case TA_ENORUNTIME:
    case TA_ENOTSUP: PyErr_SetString(NoDeviceError, text); break;
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

/* ---- _Cache ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD ta_cache_t *cache;
    PyObject *log; /* callable(level: str, message: str) or NULL */
    Py_ssize_t handles;
    int closed;
} CacheObject;

static void log_to_python(void *arg, ta_log_level_t level, const char *message)
{
    static const char *const names[] = {"error", "warning", "info", "debug"};
    if (_Py_IsFinalizing())
        return;
    PyGILState_STATE g = PyGILState_Ensure();
    CacheObject *self = arg;
    if (self->log) {
        PyObject *r = PyObject_CallFunction(self->log, "ss", names[level], message);
        if (r)
            Py_DECREF(r);
        else
            PyErr_WriteUnraisable(self->log);
    }
    PyGILState_Release(g);
}

static void cache_destroy(CacheObject *self)
{
    ta_cache_t *c = self->cache;
    self->cache = NULL;
    if (c) {
        Py_BEGIN_ALLOW_THREADS ta_cache_destroy(c);
        Py_END_ALLOW_THREADS
    }
}

static int Cache_init(CacheObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"ram_budget", "vram_budget",  "device",     "keep_ram_copy", "overflow",
                            "log",        "load_threads", "page_cache", "keep_alive_ms", NULL};
    unsigned long long ram = 0, vram = 0, keep_alive = 0;
    int device = 0, keep = 1, overflow = 0, threads = 0, page_cache = 0;
    PyObject *log = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|KipiOiiK", names, &ram, &vram, &device, &keep,
                                     &overflow, &log, &threads, &page_cache, &keep_alive))
        return -1;
    if (self->cache) {
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
                             .keep_alive_ms = keep_alive};
    if (log != Py_None) {
        Py_INCREF(log);
        self->log = log;
    }
    ta_cache_t *c = NULL;
    int rc = ta_cache_create(&cfg, &c);
    if (rc) {
        raise_rc(rc, cache_error());
        return -1;
    }
    self->cache = c;
    return 0;
}

static void Cache_dealloc(CacheObject *self)
{
    cache_destroy(self);
    Py_CLEAR(self->log);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int open_or_raise(CacheObject *self)
{
    if (!self->cache || self->closed) {
        PyErr_SetString(PyExc_ValueError, "the cache is closed");
        return -1;
    }
    return 0;
}

/* ---- _Handle: one lock of an entry -------------------------------------------- */

typedef struct {
    PyObject_HEAD CacheObject *owner;
    ta_entry_t *entry;
} HandleObject;

static PyTypeObject HandleType;

static PyObject *handle_new(CacheObject *owner, ta_entry_t *e)
{
    HandleObject *h = PyObject_New(HandleObject, &HandleType);
    if (!h) {
        Py_BEGIN_ALLOW_THREADS ta_entry_unlock(e);
        Py_END_ALLOW_THREADS return NULL;
    }
    Py_INCREF(owner);
    h->owner = owner;
    h->entry = e;
    owner->handles++;
    return (PyObject *)h;
}

static void Handle_dealloc(HandleObject *self)
{
    ta_entry_t *e = self->entry;
    Py_BEGIN_ALLOW_THREADS ta_entry_unlock(e);
    Py_END_ALLOW_THREADS CacheObject *owner = self->owner;
    if (--owner->handles == 0 && owner->closed)
        cache_destroy(owner); /* close() waited for the last view */
    Py_DECREF(owner);
    PyObject_Free(self);
}

/* ---- _Cache methods ---------------------------------------------------------------- */

static PyObject *Cache_load(CacheObject *self, PyObject *args)
{
    const char *key, *path;
    int to_device = 0;
    if (!PyArg_ParseTuple(args, "ss|p", &key, &path, &to_device) || open_or_raise(self))
        return NULL;
    ta_entry_t *e = NULL;
    int rc;
    char why[512];
    Py_BEGIN_ALLOW_THREADS for (;;)
    {
        rc = ta_cache_get(self->cache, key, &e);
        if (rc != ENOENT)
            break;
        rc = to_device ? ta_cache_load_safetensors_to_device(self->cache, key, path, &e)
                       : ta_cache_load_safetensors(self->cache, key, path, &e);
        if (rc != EEXIST) /* EEXIST: another thread loaded it meanwhile */
            break;
    }
    snprintf(why, sizeof why, "%s", rc ? cache_error() : "");
    Py_END_ALLOW_THREADS if (rc) return raise_rc(rc, why);
    return handle_new(self, e);
}

static PyObject *Cache_get(CacheObject *self, PyObject *args)
{
    const char *key;
    if (!PyArg_ParseTuple(args, "s", &key) || open_or_raise(self))
        return NULL;
    ta_entry_t *e = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = ta_cache_get(self->cache, key, &e);
    Py_END_ALLOW_THREADS if (rc == ENOENT) Py_RETURN_NONE;
    if (rc)
        return raise_rc(rc, cache_error());
    return handle_new(self, e);
}

static PyObject *Cache_remove(CacheObject *self, PyObject *args)
{
    const char *key;
    if (!PyArg_ParseTuple(args, "s", &key) || open_or_raise(self))
        return NULL;
    int rc;
    char why[512];
    Py_BEGIN_ALLOW_THREADS rc = ta_cache_remove(self->cache, key);
    snprintf(why, sizeof why, "%s", rc ? cache_error() : "");
    Py_END_ALLOW_THREADS if (rc == ENOENT)
    {
        PyErr_SetString(PyExc_KeyError, key);
        return NULL;
    }
    if (rc == EBUSY) {
        PyErr_Format(PyExc_RuntimeError, "%s (close it and drop its views first)", why);
        return NULL;
    }
    if (rc)
        return raise_rc(rc, why);
    Py_RETURN_NONE;
}

static PyObject *Cache_contains(CacheObject *self, PyObject *args)
{
    const char *key;
    if (!PyArg_ParseTuple(args, "s", &key) || open_or_raise(self))
        return NULL;
    bool found;
    Py_BEGIN_ALLOW_THREADS found = ta_cache_contains(self->cache, key);
    Py_END_ALLOW_THREADS return PyBool_FromLong(found);
}

static PyObject *Cache_keys(CacheObject *self, PyObject *noargs)
{
    (void)noargs;
    if (open_or_raise(self))
        return NULL;
    char **keys = NULL;
    size_t n = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = ta_cache_keys(self->cache, &keys, &n);
    Py_END_ALLOW_THREADS if (rc) return raise_rc(rc, cache_error());
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *k = PyUnicode_FromString(keys[i]);
        if (!k) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, k);
    }
    ta_cache_keys_free(keys);
    return list;
}

static PyObject *Cache_stats_json(CacheObject *self, PyObject *noargs)
{
    (void)noargs;
    if (open_or_raise(self))
        return NULL;
    char *text = NULL;
    size_t len = 0;
    int rc = ENOMEM;
    Py_BEGIN_ALLOW_THREADS FILE *f = open_memstream(&text, &len);
    if (f) {
        rc = ta_cache_stats_json(self->cache, f);
        fclose(f);
    }
    Py_END_ALLOW_THREADS PyObject *out =
        rc == 0 ? PyUnicode_FromStringAndSize(text, (Py_ssize_t)len) : raise_rc(rc, NULL);
    free(text);
    return out;
}

static PyObject *Cache_close(CacheObject *self, PyObject *noargs)
{
    (void)noargs;
    self->closed = 1;
    if (self->handles == 0)
        cache_destroy(self);
    Py_RETURN_NONE;
}

static PyObject *Cache_get_closed(CacheObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->closed);
}

static PyObject *Cache_get_handles(CacheObject *self, void *unused)
{
    (void)unused;
    return PyLong_FromSsize_t(self->handles);
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
     "close: no calls after it; the memory goes when the last handle does"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Cache_getset[] = {{"closed", (getter)Cache_get_closed, NULL, NULL, NULL},
                                     {"handles", (getter)Cache_get_handles, NULL, NULL, NULL},
                                     {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensoralloc._tensoralloc.Cache",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Cache_init,
    .tp_dealloc = (destructor)Cache_dealloc,
    .tp_methods = Cache_methods,
    .tp_getset = Cache_getset,
    .tp_doc = "Cache(ram_budget, vram_budget=0, device=0, keep_ram_copy=True, overflow=0, "
              "log=None, load_threads=0, page_cache=0, keep_alive_ms=0): a ta_cache_t"};

/* ---- _Buffer: one tensor's memory, for numpy and torch ------------------------------ */

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
    Py_XDECREF(self->handle);
    PyObject_Free(self);
}

static PyBufferProcs Buffer_as_buffer = {.bf_getbuffer = (getbufferproc)Buffer_getbuffer};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensoralloc._tensoralloc.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Buffer_dealloc,
    .tp_as_buffer = &Buffer_as_buffer,
    .tp_doc = "a tensor's host memory; keeps its entry locked while it lives"};

/* ---- _Handle methods ------------------------------------------------------------------ */

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
    for (int d = 0; shape && d < t.ndim; d++)
        PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(t.shape[d]));
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
    if (!t.data) {
        PyErr_Format(PyExc_ValueError,
                     "tensor '%s' is on the device only: to_host() first for a host view", t.name);
        return NULL;
    }
    BufferObject *b = PyObject_New(BufferObject, &BufferType);
    if (!b)
        return NULL;
    Py_INCREF(self);
    b->handle = self;
    b->data = t.data;
    b->len = (Py_ssize_t)t.nbytes;
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
    if (open_or_raise(self->owner))
        return NULL;
    int rc;
    char why[512];
    Py_BEGIN_ALLOW_THREADS rc =
        to_device ? ta_entry_to_device(self->entry) : ta_entry_to_host(self->entry);
    snprintf(why, sizeof why, "%s", rc ? cache_error() : "");
    Py_END_ALLOW_THREADS if (rc) return raise_rc(rc, why);
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

enum { SIZE_COUNT, SIZE_RAM, SIZE_VRAM };

/* count, ram_bytes and vram_bytes: which is the getset closure. */
static PyObject *Handle_get_size(HandleObject *self, void *which)
{
    switch ((uintptr_t)which) {
    case SIZE_COUNT: return PyLong_FromSize_t(ta_entry_tensor_count(self->entry));
    case SIZE_RAM: return PyLong_FromSize_t(ta_entry_ram_bytes(self->entry));
    default: return PyLong_FromSize_t(ta_entry_vram_bytes(self->entry));
    }
}

static PyMethodDef Handle_methods[] = {
    {"info", (PyCFunction)Handle_info, METH_VARARGS,
     "info(i) -> (name, dtype, shape, nbytes, on_host, on_device)"},
    {"buffer", (PyCFunction)Handle_buffer, METH_VARARGS,
     "buffer(i) -> Buffer over tensor i's host memory"},
    {"device_pointer", (PyCFunction)Handle_device_pointer, METH_VARARGS,
     "device_pointer(i) -> int (0: not on the device)"},
    {"to_device", (PyCFunction)Handle_to_device, METH_NOARGS, "ta_entry_to_device"},
    {"to_host", (PyCFunction)Handle_to_host, METH_NOARGS, "ta_entry_to_host"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Handle_getset[] = {
    {"key", (getter)Handle_get_key, NULL, NULL, NULL},
    {"count", (getter)Handle_get_size, NULL, NULL, (void *)(uintptr_t)SIZE_COUNT},
    {"ram_bytes", (getter)Handle_get_size, NULL, NULL, (void *)(uintptr_t)SIZE_RAM},
    {"vram_bytes", (getter)Handle_get_size, NULL, NULL, (void *)(uintptr_t)SIZE_VRAM},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensoralloc._tensoralloc.Handle",
    .tp_basicsize = sizeof(HandleObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Handle_dealloc,
    .tp_methods = Handle_methods,
    .tp_getset = Handle_getset,
    .tp_doc = "one lock of a cache entry, released when the handle is collected"};

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
    (void)m, (void)noargs;
    ta_stats_t st = {.size = sizeof st};
    int rc = ta_stats_get(&st);
    if (rc)
        return raise_rc(rc, NULL);
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
    Py_BEGIN_ALLOW_THREADS ta_trim();
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *mod_snapshot(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    ta_memory_snapshot_t s;
    Py_BEGIN_ALLOW_THREADS ta_memory_snapshot(&s);
    Py_END_ALLOW_THREADS return Py_BuildValue("(KKKKKKK)", s.rss, s.mapped, s.small_used,
                                              s.small_free, s.total_allocated, s.total_used,
                                              s.vram);
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

static PyMethodDef module_methods[] = {
    {"mallinfo2", mod_mallinfo2, METH_NOARGS, "ta_mallinfo2 as a dict"},
    {"stats", mod_stats, METH_NOARGS, "ta_stats_get as a dict (names from ta_stats_field)"},
    {"trim", mod_trim, METH_NOARGS, "ta_trim"},
    {"snapshot", mod_snapshot, METH_NOARGS, "ta_memory_snapshot as a tuple"},
    {"snapshot_diff", mod_snapshot_diff, METH_VARARGS, "ta_memory_snapshot_diff of two tuples"},
    {"budget_rule", mod_budget_rule, METH_VARARGS, "ta_cache_budget_rule(memory, vram, working)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, .m_name = "_tensoralloc",
                                        .m_doc = "tensoralloc's model cache and statistics",
                                        .m_size = -1, .m_methods = module_methods};

static int add_exception(PyObject *m, PyObject **slot, const char *name, PyObject *base,
                         const char *doc)
{
    *slot = PyErr_NewExceptionWithDoc(name, doc, base, NULL);
    return *slot ? PyModule_AddObjectRef(m, strrchr(name, '.') + 1, *slot) : -1;
}

PyMODINIT_FUNC PyInit__tensoralloc(void);
PyMODINIT_FUNC PyInit__tensoralloc(void)
{
    if (PyType_Ready(&CacheType) < 0 || PyType_Ready(&HandleType) < 0 ||
        PyType_Ready(&BufferType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Cache", (PyObject *)&CacheType) < 0 ||
        PyModule_AddObjectRef(m, "Handle", (PyObject *)&HandleType) < 0 ||
        PyModule_AddObjectRef(m, "Buffer", (PyObject *)&BufferType) < 0 ||
        add_exception(m, &FormatError, "tensoralloc.FormatError", PyExc_ValueError,
                      "a malformed file; the message is the loader's") < 0 ||
        add_exception(m, &CacheFullError, "tensoralloc.CacheFullError", PyExc_MemoryError,
                      "the budget cannot be met") < 0 ||
        add_exception(m, &NoDeviceError, "tensoralloc.NoDeviceError", PyExc_RuntimeError,
                      "no GPU, or no CUDA runtime") < 0 ||
        PyModule_AddStringConstant(m, "library_version", ta_version()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
