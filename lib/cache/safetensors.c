/* SPDX-License-Identifier: MIT */
/*
 * Reads and checks a safetensors header with cJSON. Every rule is checked
 * here, before the cache evicts or allocates anything, so a bad file
 * changes nothing: header length inside the file, valid JSON, known
 * dtypes, shapes that match the byte counts, offsets inside the data
 * section, no two tensors sharing bytes, no duplicate names.
 */
#define _GNU_SOURCE
#include "safetensors.h"
#include "os/os.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtypes[TA_DTYPE_COUNT_] = {
    [TA_DTYPE_BOOL] = {"BOOL", 1},       [TA_DTYPE_U8] = {"U8", 1},
    [TA_DTYPE_I8] = {"I8", 1},           [TA_DTYPE_U16] = {"U16", 2},
    [TA_DTYPE_I16] = {"I16", 2},         [TA_DTYPE_F16] = {"F16", 2},
    [TA_DTYPE_BF16] = {"BF16", 2},       [TA_DTYPE_U32] = {"U32", 4},
    [TA_DTYPE_I32] = {"I32", 4},         [TA_DTYPE_F32] = {"F32", 4},
    [TA_DTYPE_U64] = {"U64", 8},         [TA_DTYPE_I64] = {"I64", 8},
    [TA_DTYPE_F64] = {"F64", 8},         [TA_DTYPE_F8_E4M3] = {"F8_E4M3", 1},
    [TA_DTYPE_F8_E5M2] = {"F8_E5M2", 1},
};

size_t ta_dtype_size(ta_dtype_t dtype)
{
    return (unsigned)dtype < TA_DTYPE_COUNT_ ? dtypes[dtype].size : 0;
}

const char *ta_dtype_name(ta_dtype_t dtype)
{
    return (unsigned)dtype < TA_DTYPE_COUNT_ ? dtypes[dtype].name : "?";
}

int _ta_st_dtype_from_name(const char *name)
{
    for (int i = 0; i < TA_DTYPE_COUNT_; i++)
        if (strcmp(name, dtypes[i].name) == 0)
            return i;
    return -1;
}

void _ta_st_free(_ta_st_header_t *h)
{
    for (size_t i = 0; i < h->count; i++)
        free(h->tensors[i].name);
    free(h->tensors);
    memset(h, 0, sizeof *h);
}

/* A JSON number that is a whole number in [0, 2^53]. */
static bool whole(const cJSON *n, uint64_t *out)
{
    if (!cJSON_IsNumber(n) || n->valuedouble < 0 || n->valuedouble > 9007199254740992.0 ||
        n->valuedouble != (double)(uint64_t)n->valuedouble)
        return false;
    *out = (uint64_t)n->valuedouble;
    return true;
}

static int by_begin(const void *a, const void *b)
{
    const _ta_st_tensor_t *x = *(const _ta_st_tensor_t *const *)a;
    const _ta_st_tensor_t *y = *(const _ta_st_tensor_t *const *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

typedef struct {
    const char *name;
    size_t at; /* its place among the header's tensors */
} name_at_t;

static int by_name_then_place(const void *a, const void *b)
{
    const name_at_t *x = a, *y = b;
    int d = strcmp(x->name, y->name);
    return d ? d : (x->at > y->at) - (x->at < y->at);
}

static int format_error(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int format_error(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return TA_EFORMAT;
}

#define FAIL(...) return format_error(err, errlen, __VA_ARGS__)

/* The 8-byte length and the JSON text after it (NUL-terminated, *text
 * malloc'd) of a file of size bytes. */
static int read_json(int fd, uint64_t size, char **text, uint64_t *len, char *err, size_t errlen)
{
    unsigned char len8[8];
    if (size < 8)
        FAIL("file is %llu bytes, shorter than the 8-byte header length", (unsigned long long)size);
    size_t got;
    int rc;
    if ((rc = _ta_os_read_at(fd, len8, 8, 0, &got)) != 0 || got != 8)
        return rc ? rc : EIO;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | len8[i]; /* little-endian */
    if (n > size - 8)
        FAIL("header length %llu runs past the end of the file (%llu bytes after the length)",
             (unsigned long long)n, (unsigned long long)(size - 8));
    if (n > TA_ST_MAX_HEADER)
        FAIL("header length %llu exceeds the 100 MiB limit", (unsigned long long)n);
    if (n < 2)
        FAIL("header length %llu is too short for a JSON object", (unsigned long long)n);
    char *t = malloc((size_t)n + 1);
    if (!t)
        return ENOMEM;
    for (size_t done = 0; done < (size_t)n; done += got)
        if ((rc = _ta_os_read_at(fd, t + done, (size_t)n - done, 8 + done, &got)) != 0 ||
            got == 0) {
            free(t);
            return rc ? rc : EIO; /* shrank since the size was read */
        }
    t[n] = '\0';
    *text = t;
    *len = n;
    return 0;
}

/* The shape of t from its JSON array; elems: the product. */
static int read_shape(const cJSON *shape, _ta_st_tensor_t *t, uint64_t *elems, char *err,
                      size_t errlen)
{
    const char *name = t->name;
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > TA_MAX_DIMS)
        FAIL("tensor '%s': %d dimensions, at most %d supported", name, ndim, TA_MAX_DIMS);
    t->ndim = ndim;
    *elems = 1;
    int d = 0;
    for (const cJSON *e = shape->child; e; e = e->next, d++) {
        uint64_t v;
        if (!whole(e, &v))
            FAIL("tensor '%s': shape[%d] is not a non-negative integer", name, d);
        t->shape[d] = (int64_t)v;
        if (v && *elems > UINT64_MAX / v)
            FAIL("tensor '%s': shape overflows", name);
        *elems *= v;
    }
    return 0;
}

/* One tensor's entry c, appended to out->tensors and checked. */
static int read_tensor(const cJSON *c, _ta_st_header_t *out, char *err, size_t errlen)
{
    const char *name = c->string;
    if (!cJSON_IsObject(c))
        FAIL("tensor '%s': not an object", name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(c, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(c, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(c, "data_offsets");
    if (!cJSON_IsString(dt))
        FAIL("tensor '%s': missing dtype", name);
    int dtype = _ta_st_dtype_from_name(dt->valuestring);
    if (dtype < 0)
        FAIL("tensor '%s': unknown dtype '%s'", name, dt->valuestring);
    if (!cJSON_IsArray(shape))
        FAIL("tensor '%s': shape is not an array", name);
    _ta_st_tensor_t *t = &out->tensors[out->count];
    if (!(t->name = strdup(name)))
        return ENOMEM;
    out->count++;
    t->dtype = (ta_dtype_t)dtype;
    uint64_t elems = 0;
    int rc = read_shape(shape, t, &elems, err, errlen);
    if (rc)
        return rc;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !whole(offs->child, &t->begin) ||
        !whole(offs->child->next, &t->end))
        FAIL("tensor '%s': data_offsets is not a pair of non-negative integers", name);
    if (t->begin > t->end || t->end > out->data_len)
        FAIL("tensor '%s': data_offsets [%llu, %llu] out of range (data section is %llu bytes)",
             name, (unsigned long long)t->begin, (unsigned long long)t->end,
             (unsigned long long)out->data_len);
    uint64_t esize = dtypes[dtype].size;
    if (elems > UINT64_MAX / esize || elems * esize != t->end - t->begin)
        FAIL("tensor '%s': shape of %llu %s elements needs %llu bytes but data_offsets span %llu",
             name, (unsigned long long)elems, dtypes[dtype].name,
             (unsigned long long)(elems * esize), (unsigned long long)(t->end - t->begin));
    return 0;
}

/* No two tensors may share bytes. Checked against the furthest end so far,
 * not the neighbour: an empty tensor between two overlapping ones must not
 * hide the overlap (sorted by begin, any overlap shows against the
 * furthest). */
static int check_overlaps(const _ta_st_header_t *h, char *err, size_t errlen)
{
    if (h->count < 2)
        return 0;
    const _ta_st_tensor_t **sorted = malloc(h->count * sizeof *sorted);
    if (!sorted)
        return ENOMEM;
    for (size_t i = 0; i < h->count; i++)
        sorted[i] = &h->tensors[i];
    qsort(sorted, h->count, sizeof *sorted, by_begin);
    const _ta_st_tensor_t *a = NULL; /* the non-empty tensor reaching furthest */
    int rc = 0;
    for (size_t i = 0; i < h->count && rc == 0; i++) {
        const _ta_st_tensor_t *b = sorted[i];
        if (b->end == b->begin)
            continue; /* empty: overlaps nothing */
        if (a != NULL && b->begin < a->end)
            rc =
                format_error(err, errlen, "tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap",
                             a->name, (unsigned long long)a->begin, (unsigned long long)a->end,
                             b->name, (unsigned long long)b->begin, (unsigned long long)b->end);
        else if (a == NULL || b->end > a->end)
            a = b;
    }
    free(sorted);
    return rc;
}

/* The place, in header order, of the first of count tensors whose name an
 * earlier one has (SIZE_MAX if none): sorted by name, then place, equal
 * names are neighbours; O(n log n) where comparing each name with every
 * earlier one took a second for 20,000 names, and the 100 MiB header cap
 * admits about 1.5 million. */
static int first_duplicate(const cJSON *root, size_t count, size_t *dup)
{
    *dup = SIZE_MAX;
    if (count < 2)
        return 0;
    name_at_t *v = malloc(count * sizeof *v);
    if (!v)
        return ENOMEM;
    size_t n = 0;
    for (const cJSON *c = root->child; c; c = c->next)
        if (strcmp(c->string, "__metadata__") != 0) {
            v[n].name = c->string;
            v[n].at = n;
            n++;
        }
    qsort(v, n, sizeof *v, by_name_then_place);
    for (size_t i = 1; i < n; i++)
        if (v[i].at < *dup && strcmp(v[i - 1].name, v[i].name) == 0)
            *dup = v[i].at;
    free(v);
    return 0;
}

/* The tensors of a parsed header object. */
static int read_tensors(const cJSON *root, _ta_st_header_t *out, char *err, size_t errlen)
{
    if (!cJSON_IsObject(root))
        FAIL("header is JSON but not an object");
    size_t count = 0, dup;
    for (const cJSON *c = root->child; c; c = c->next)
        count += strcmp(c->string, "__metadata__") != 0;
    if (!(out->tensors = calloc(count ? count : 1, sizeof *out->tensors)))
        return ENOMEM;
    int rc = first_duplicate(root, count, &dup);
    if (rc)
        return rc;
    for (const cJSON *c = root->child; c; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(c))
                FAIL("__metadata__ is not an object");
        } else if (out->count == dup) { /* where the pairwise check found it */
            FAIL("tensor '%s' appears twice", c->string);
        } else if ((rc = read_tensor(c, out, err, errlen)) != 0) {
            return rc;
        }
    }
    return check_overlaps(out, err, errlen);
}

int _ta_st_read_header(int fd, _ta_st_header_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    uint64_t size = 0, n = 0;
    char *text = NULL;
    int rc = _ta_os_file_size(fd, &size);
    if (rc == 0)
        rc = read_json(fd, size, &text, &n, err, errlen);
    if (rc)
        return rc;
    cJSON *root = cJSON_ParseWithLength(text, (size_t)n);
    if (root == NULL) {
        const char *where = cJSON_GetErrorPtr();
        long at = where && where >= text && where <= text + n ? (long)(where - text) : -1;
        rc = format_error(err, errlen, "header is not valid JSON (error near byte %ld of %llu)", at,
                          (unsigned long long)n);
    } else {
        out->data_start = 8 + n;
        out->data_len = size - 8 - n;
        rc = read_tensors(root, out, err, errlen);
    }
    cJSON_Delete(root);
    free(text);
    if (rc)
        _ta_st_free(out);
    return rc;
}
