/* SPDX-License-Identifier: MIT */
/*
 * Suite "cache": eviction order, locks, the budget invariant under a long
 * randomized run, exact statistics, safetensors and raw loading (every
 * malformed case leaves the cache as it was), device moves against the
 * CUDA test double, and concurrent use.
 */
#define _GNU_SOURCE
#include "cache/loader.h"
#include "helpers.h"
#include "tensoralloc_cache.h"
#include "tensoralloc_cuda.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char dir[64];

/* The message of this thread's last failed cache call. */
static const char *cache_error(void)
{
    const char *message;
    ta_cache_last_error(&message);
    return message;
}

static void make_dir(void)
{
    strcpy(dir, "/tmp/ta-cache-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}

static void remove_dir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        cr_log_warn("could not remove %s", dir);
}

TestSuite(cache, .init = make_dir, .fini = remove_dir, .timeout = 240); /* a hang fails by name */

static ta_cache_t *new_cache(size_t budget, ta_overflow_t overflow)
{
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = budget,
                             .overflow = overflow,
                             .vram_budget = 0,
                             .keep_ram_copy = true};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    return c;
}

static ta_cache_stats_t cstats(ta_cache_t *c)
{
    ta_cache_stats_t s = {.size = sizeof s};
    cr_assert_eq(ta_cache_stats_get(c, &s), 0);
    return s;
}

/* An entry of one U8 tensor of n bytes filled with fill; left unlocked. */
static int put(ta_cache_t *c, const char *key, size_t n, int fill)
{
    ta_entry_t *e;
    int rc = ta_cache_create_entry(c, key, &e);
    if (rc)
        return rc;
    int64_t shape[1] = {(int64_t)n};
    void *data;
    rc = ta_entry_add_tensor(e, "w", TA_DTYPE_U8, 1, shape, &data);
    if (rc == 0)
        memset(data, fill, n);
    ta_entry_unlock(e);
    if (rc)
        ta_cache_remove(c, key);
    return rc;
}

static bool present(ta_cache_t *c, const char *key)
{
    ta_entry_t *e;
    if (ta_cache_get(c, key, &e) != 0)
        return false;
    ta_entry_unlock(e);
    return true;
}

Test(cache, least_recently_used_goes_first)
{
    ta_cache_t *c = new_cache(3 * MiB, TA_OVERFLOW_REFUSE);
    cr_assert_eq(put(c, "a", MiB, 1), 0);
    cr_assert_eq(put(c, "b", MiB, 2), 0);
    cr_assert_eq(put(c, "c", MiB, 3), 0);
    cr_assert(present(c, "a")); /* a is now the most recent */
    cr_assert_eq(put(c, "d", MiB, 4), 0);
    cr_assert_not(present(c, "b"), "b was the least recently used");
    cr_assert(present(c, "a") && present(c, "c") && present(c, "d"));
    cr_assert_eq(put(c, "e", 2 * MiB, 5), 0); /* LRU now: a, c, d -> a and c go */
    cr_assert_not(present(c, "a"));
    cr_assert_not(present(c, "c"));
    cr_assert(present(c, "d") && present(c, "e"));
    cr_assert_eq(cstats(c).cleared, 3);
    ta_cache_destroy(c);
}

Test(cache, locked_entries_are_never_evicted)
{
    ta_cache_t *c = new_cache(2 * MiB, TA_OVERFLOW_REFUSE);
    cr_assert_eq(put(c, "a", MiB, 1), 0);
    ta_entry_t *held;
    cr_assert_eq(ta_cache_get(c, "a", &held), 0); /* locked */
    cr_assert_eq(put(c, "b", MiB, 2), 0);
    cr_assert_eq(put(c, "c", MiB, 3), 0); /* b goes, a stays */
    cr_assert_not(present(c, "b"));
    ta_entry_t *c_held;
    cr_assert_eq(ta_cache_get(c, "c", &c_held), 0);
    ta_cache_stats_t before = cstats(c);
    cr_assert_eq(put(c, "d", MiB, 4), TA_ECACHEFULL, "everything else is locked");
    cr_assert(strstr(cache_error(), "locked"), "%s", cache_error());
    ta_cache_stats_t after = cstats(c);
    cr_assert_eq(after.in_cache, before.in_cache);
    cr_assert_eq(after.ram_used, before.ram_used);
    ta_tensor_t t;
    cr_assert_eq(ta_entry_tensor(held, "w", &t), 0);
    cr_assert_eq(((unsigned char *)t.data)[MiB - 1], 1, "locked data intact");
    cr_assert_eq(ta_cache_remove(c, "a"), EBUSY);
    ta_entry_unlock(held);
    ta_entry_unlock(c_held);
    cr_assert_eq(ta_cache_remove(c, "a"), 0);
    cr_assert_eq(ta_cache_remove(c, "a"), ENOENT);
    cr_assert_eq(put(c, "toobig", 3 * MiB, 0), TA_EBUDGET);
    ta_cache_destroy(c);
}

static char logged[8192];
static void capture_log(void *arg, ta_log_level_t level, const char *msg)
{
    (void)arg;
    size_t used = strlen(logged);
    snprintf(logged + used, sizeof logged - used, "%d:%s\n", (int)level, msg);
}

Test(cache, admit_policy_goes_over_budget_with_a_warning)
{
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = MiB,
                             .overflow = TA_OVERFLOW_ADMIT,
                             .log = capture_log,
                             .log_level = TA_LOG_WARN};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_create_entry(c, "a", &e), 0);
    int64_t shape[1] = {(int64_t)(2 * MiB)};
    void *d;
    cr_assert_eq(ta_entry_add_tensor(e, "w", TA_DTYPE_U8, 1, shape, &d), 0);
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.over_budget_admits, 1);
    cr_assert_eq(s.ram_used, 2 * MiB);
    cr_assert(strstr(logged, "over the RAM budget"), "%s", logged);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

Test(cache, statistics_are_exact)
{
    ta_cache_t *c = new_cache(4 * MiB, TA_OVERFLOW_REFUSE);
    cr_assert_eq(put(c, "a", MiB, 1), 0);
    cr_assert_eq(put(c, "b", 2 * MiB, 2), 0);
    cr_assert(present(c, "a"));
    cr_assert(present(c, "a"));
    cr_assert_not(present(c, "zzz"));
    cr_assert_eq(put(c, "c", 2 * MiB, 3), 0); /* evicts b */
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.hits, 2);
    cr_assert_eq(s.misses, 1);
    cr_assert_eq(s.in_cache, 2);
    cr_assert_eq(s.cleared, 1);
    cr_assert_eq(s.ram_used, 3 * MiB);
    cr_assert_eq(s.high_watermark, 3 * MiB);
    cr_assert_eq(s.ram_budget, 4 * MiB);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_eq(ta_cache_stats_json(c, f), 0);
    fclose(f);
    cr_assert(strstr(buf, "\"hits\": 2"), "%s", buf);
    cr_assert(
        strstr(buf, "\"loaded_model_sizes\": {\"a\": 1048576, \"b\": 2097152, \"c\": 2097152}"),
        "%s", buf);
    free(buf);
    ta_cache_destroy(c);
}

/* Budget invariant: a long random sequence of operations, checked after
 * each; entries this test holds locked must keep their data. */
Test(cache, budget_holds_after_every_operation, .timeout = 120)
{
    const size_t budget = 8 * MiB;
    ta_cache_t *c = new_cache(budget, TA_OVERFLOW_REFUSE);
    uint64_t seed = 12345;
    ta_entry_t *held[4] = {0};
    int held_fill[4] = {0};
    int ops = 0, refused = 0;
    for (int i = 0; i < 6000; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        unsigned r = (unsigned)(seed >> 33);
        char key[16];
        snprintf(key, sizeof key, "k%u", r % 40);
        switch (r % 7) {
        case 0:
        case 1:
        case 2: {
            size_t n = (size_t)(r >> 8) % (3 * MiB) + 1;
            int rc = put(c, key, n, (int)(r & 0x7f));
            cr_assert(rc == 0 || rc == EEXIST || rc == TA_ECACHEFULL, "put rc %d", rc);
            refused += rc == TA_ECACHEFULL;
            break;
        }
        case 3: present(c, key); break;
        case 4: ta_cache_remove(c, key); break;
        case 5: { /* hold one entry locked for a while */
            int k = (int)(r >> 12) % 4;
            if (held[k]) {
                ta_tensor_t t;
                cr_assert_eq(ta_entry_tensor(held[k], "w", &t), 0);
                cr_assert_eq(((unsigned char *)t.data)[t.nbytes - 1], held_fill[k],
                             "data of a locked entry changed");
                ta_entry_unlock(held[k]);
                held[k] = NULL;
            } else if (ta_cache_get(c, key, &held[k]) == 0) {
                ta_tensor_t t;
                ta_entry_tensor(held[k], "w", &t);
                held_fill[k] = ((unsigned char *)t.data)[t.nbytes - 1];
            }
            break;
        }
        default: break;
        }
        ta_cache_stats_t s = cstats(c);
        cr_assert_leq(s.ram_used, budget, "op %d: %llu used of %zu", i,
                      (unsigned long long)s.ram_used, budget);
        cr_assert_leq(s.high_watermark, budget);
        ops++;
    }
    for (int k = 0; k < 4; k++)
        ta_entry_unlock(held[k]);
    for (int k = 0; k < 40; k++) {
        char key[16];
        snprintf(key, sizeof key, "k%d", k);
        ta_cache_remove(c, key);
    }
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.ram_used, 0);
    cr_assert_eq(s.in_cache, 0);
    cr_assert_gt(s.cleared, 100, "the run exercised eviction");
    cr_log_info("%d operations, %d refused, %llu evictions", ops, refused,
                (unsigned long long)s.cleared);
    ta_cache_destroy(c);
}

/* ---- safetensors ------------------------------------------------------------- */

/* Writes a safetensors file: header text as given, then data_len bytes. */
static void write_file(const char *path, uint64_t header_len_field, const char *header,
                       size_t data_len, unsigned char fill)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)(header_len_field >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_len; i++)
        fputc((int)(unsigned char)(fill + i * 7), f);
    fclose(f);
}

static void write_st(const char *path, const char *header, size_t data_len)
{
    write_file(path, strlen(header), header, data_len, 3);
}

Test(cache, safetensors_load_by_name_dtype_shape)
{
    char path[128];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    /* a: F32 [2,3] = 24 bytes at 0; b: I64 [4] = 32 at 24; big: BF16 [512,1024] */
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                      "\"b\":{\"dtype\":\"I64\",\"shape\":[4],\"data_offsets\":[24,56]},"
                      "\"big\":{\"dtype\":\"BF16\",\"shape\":[512,1024],"
                      "\"data_offsets\":[56,1048632]}}";
    write_st(path, hdr, 1048632);
    ta_cache_t *c = new_cache(8 * MiB, TA_OVERFLOW_REFUSE);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors(c, "m", path, &e), 0, "%s", cache_error());
    cr_assert_eq(ta_entry_tensor_count(e), 3);
    ta_tensor_t t;
    cr_assert_eq(ta_entry_tensor(e, "b", &t), 0);
    cr_assert_eq(t.dtype, TA_DTYPE_I64);
    cr_assert_eq(t.ndim, 1);
    cr_assert_eq(t.shape[0], 4);
    cr_assert_eq(t.nbytes, 32);
    cr_assert_eq(((unsigned char *)t.data)[0], (unsigned char)(3 + 24 * 7), "bytes from offset 24");
    cr_assert_eq(ta_entry_tensor(e, "big", &t), 0);
    cr_assert_eq(t.shape[0], 512);
    cr_assert_eq(t.shape[1], 1024);
    cr_assert_eq(t.nbytes, 1048576);
    cr_assert_eq(((unsigned char *)t.data)[1000], (unsigned char)(3 + (56 + 1000) * 7));
    cr_assert_eq(ta_usable_size(t.data) >= t.nbytes, 1);
    cr_assert_eq(ta_entry_tensor(e, "nope", &t), ENOENT);
    cr_assert_eq(ta_entry_ram_bytes(e), 1048632);
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.loads, 1);
    cr_assert_eq(s.load_bytes, 1048632);
    cr_assert_eq(ta_cache_load_safetensors(c, "m", path, &e), EEXIST);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

/* Each malformed file is refused with a precise message, and the cache is
 * exactly as it was: "keep" would have been evicted by a load that got past
 * the checks. */
static void expect_refused(const char *path, const char *needle)
{
    ta_cache_t *c = new_cache(2 * MiB, TA_OVERFLOW_REFUSE);
    cr_assert_eq(put(c, "keep", 2 * MiB - 100, 9), 0);
    ta_cache_stats_t before = cstats(c);
    ta_entry_t *e = NULL;
    int rc = ta_cache_load_safetensors(c, "bad", path, &e);
    cr_assert_eq(rc, TA_EFORMAT, "%s: rc %d (%s)", path, rc, cache_error());
    cr_assert(strstr(cache_error(), needle), "message '%s' lacks '%s'", cache_error(), needle);
    cr_assert_null(e);
    ta_cache_stats_t after = cstats(c);
    cr_assert_eq(after.in_cache, before.in_cache);
    cr_assert_eq(after.ram_used, before.ram_used);
    cr_assert_eq(after.cleared, before.cleared);
    cr_assert_eq(after.loads, before.loads);
    cr_assert(present(c, "keep"));
    cr_assert_not(present(c, "bad"));
    ta_cache_destroy(c);
}

/* A load writes its tensors whole at once: under THP=auto (the default)
 * their fresh mappings are advised huge pages from the first load of a
 * process on, where a program's first blocks are probes, unadvised until
 * read (issue 25: the first load into fresh memory ran at 0.5x dd). A
 * tensor over 2 MiB has a mapping of its own; one under it is cut from a
 * run of 8 MiB. */
Test(cache, a_first_load_maps_its_tensors_as_huge_pages)
{
    REQUIRE_THP_AUTO();
    char path[128];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    const char *hdr = "{\"big\":{\"dtype\":\"U8\",\"shape\":[6291456],"
                      "\"data_offsets\":[0,6291456]},"
                      "\"expert\":{\"dtype\":\"U8\",\"shape\":[786432],"
                      "\"data_offsets\":[6291456,7077888]}}";
    write_st(path, hdr, 7077888);
    ta_cache_t *c = new_cache(64 * MiB, TA_OVERFLOW_REFUSE);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors(c, "m", path, &e), 0, "%s", cache_error());
    ta_tensor_t big, expert;
    cr_assert_eq(ta_entry_tensor(e, "big", &big), 0);
    cr_assert_eq(ta_entry_tensor(e, "expert", &expert), 0);
    cr_assert(advised(big.data), "the first load's 6 MiB tensor is not advised huge pages");
    cr_assert(advised(expert.data), "the first load's 768 KiB tensor is not in an advised run");
    cr_assert_eq(((unsigned char *)expert.data)[5], (unsigned char)(3 + (6291456 + 5) * 7));
    ta_entry_unlock(e);

    ta_entry_unlock(e);
    ta_cache_destroy(c);

    /* ta_malloc's blocks keep the rule: nothing was probed yet, so a fresh
     * mapping (the pool emptied) is a probe */
    ta_trim();
    unsigned char *p = ta_malloc(16 * MiB);
    cr_assert_not(advised(p), "a program's own first fresh block should be a probe");
    ta_free(p);
}

/* The same for a raw file's one tensor, in a process that loaded nothing
 * before (each test is a process of its own). */
Test(cache, a_first_raw_load_maps_its_tensor_as_huge_pages)
{
    if (!_ta_os_thp_available())
        cr_skip_test("transparent huge pages are disabled on this machine");
    char path[128];
    ta_cache_t *c = new_cache(64 * MiB, TA_OVERFLOW_REFUSE);
    ta_entry_t *e;
    snprintf(path, sizeof path, "%s/raw.bin", dir);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    for (size_t i = 0; i < 4 * MiB; i++)
        fputc((int)(unsigned char)(5 + i * 7), f);
    fclose(f);
    int64_t shape[1] = {(int64_t)(4 * MiB)};
    cr_assert_eq(ta_cache_load_raw(c, "r", path, TA_DTYPE_U8, 1, shape, &e), 0, "%s",
                 cache_error());
    ta_tensor_t raw;
    cr_assert_eq(ta_entry_tensor(e, "data", &raw), 0);
    cr_assert(advised(raw.data), "a raw load's 4 MiB tensor is not advised huge pages");
    cr_assert_eq(((unsigned char *)raw.data)[9], (unsigned char)(5 + 9 * 7));
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

Test(cache, malformed_safetensors_are_refused_and_change_nothing)
{
    char p[128];
    const char *ok_tensor = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";

    snprintf(p, sizeof p, "%s/short", dir);
    FILE *f = fopen(p, "wb");
    fwrite("\x05\x00\x00", 1, 3, f);
    fclose(f);
    expect_refused(p, "shorter than the 8-byte header length");

    snprintf(p, sizeof p, "%s/len", dir);
    write_file(p, 1000000, ok_tensor, 16, 0);
    expect_refused(p, "runs past the end of the file");

    snprintf(p, sizeof p, "%s/json", dir);
    write_st(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],", 16);
    expect_refused(p, "not valid JSON");

    snprintf(p, sizeof p, "%s/notobj", dir);
    write_st(p, "[1,2,3]", 0);
    expect_refused(p, "not an object");

    snprintf(p, sizeof p, "%s/range", dir);
    write_st(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8);
    expect_refused(p, "out of range");

    snprintf(p, sizeof p, "%s/truncated", dir); /* data cut short: same check */
    write_st(p, "{\"w\":{\"dtype\":\"U8\",\"shape\":[100],\"data_offsets\":[0,100]}}", 99);
    expect_refused(p, "out of range (data section is 99 bytes)");

    snprintf(p, sizeof p, "%s/overlap", dir);
    write_st(p,
             "{\"a\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[0,10]},"
             "\"b\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[5,15]}}",
             15);
    expect_refused(p, "overlap");

    /* an empty tensor between two overlapping ones hid the overlap */
    snprintf(p, sizeof p, "%s/overlap-empty", dir);
    write_st(p,
             "{\"a\":{\"dtype\":\"U8\",\"shape\":[100],\"data_offsets\":[0,100]},"
             "\"e\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[10,10]},"
             "\"c\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[20,30]}}",
             100);
    expect_refused(p, "tensors 'a' [0, 100) and 'c' [20, 30) overlap");

    snprintf(p, sizeof p, "%s/dtype", dir);
    write_st(p, "{\"w\":{\"dtype\":\"Q4\",\"shape\":[4],\"data_offsets\":[0,2]}}", 2);
    expect_refused(p, "unknown dtype 'Q4'");

    snprintf(p, sizeof p, "%s/shape", dir);
    write_st(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 20);
    expect_refused(p, "needs 24 bytes but data_offsets span 20");

    snprintf(p, sizeof p, "%s/negshape", dir);
    write_st(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4);
    expect_refused(p, "shape[0] is not a non-negative integer");

    snprintf(p, sizeof p, "%s/offs", dir);
    write_st(p, "{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4]}}", 8);
    expect_refused(p, "not a pair");

    snprintf(p, sizeof p, "%s/dup", dir);
    write_st(p,
             "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
             "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
             2);
    expect_refused(p, "appears twice");

    /* the first name, in header order, that an earlier tensor has */
    snprintf(p, sizeof p, "%s/dup-order", dir);
    write_st(p,
             "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
             "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]},"
             "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]},"
             "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[3,4]}}",
             4);
    expect_refused(p, "tensor 'b' appears twice");
}

/* A header of n empty tensors "t0" .. "t<n-1>", and when dup >= 0 one more
 * named "t<dup>" at the end. */
static void write_names(const char *path, int n, int dup)
{
    size_t cap = (size_t)(n + 1) * 64 + 16, len = 0;
    char *hdr = malloc(cap);
    cr_assert_not_null(hdr);
    hdr[len++] = '{';
    for (int i = 0; i <= n; i++) {
        if (i == n && dup < 0)
            break;
        len += (size_t)snprintf(hdr + len, cap - len,
                                "%s\"t%d\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}",
                                i ? "," : "", i < n ? i : dup);
    }
    hdr[len++] = '}';
    hdr[len] = '\0';
    write_st(path, hdr, 0);
    free(hdr);
}

/* A million names; a tenth of them under valgrind (its tenfold deadline is
 * meson's, not Criterion's), still far past what pairwise checks finish. */
static int million(void)
{
    return under_valgrind() ? 100000 : 1000000;
}

/* Names are checked for duplicates by sorting, not pairwise: a million
 * tensors (a 55 MB header, inside the 100 MiB cap) load in seconds (about
 * 9 here, 24 under AddressSanitizer, most of it cJSON's parse). Before,
 * each name was compared with every earlier one: 20,000 names took about a
 * second and a million would take about 40 minutes (the deadline fails it). */
Test(cache, a_million_names_are_checked_for_duplicates_quickly, .timeout = 90)
{
    char path[128];
    snprintf(path, sizeof path, "%s/names.safetensors", dir);
    const int n = million();
    write_names(path, n, -1);
    ta_cache_t *c = new_cache(64 * MiB, TA_OVERFLOW_REFUSE);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors(c, "names", path, &e), 0, "%s", cache_error());
    cr_assert_eq(ta_entry_tensor_count(e), (size_t)n);
    ta_tensor_t t;
    char last[16];
    snprintf(last, sizeof last, "t%d", n - 1);
    cr_assert_eq(ta_entry_tensor(e, last, &t), 0);
    cr_assert_eq(t.nbytes, 0);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

/* ... and a duplicate among them is still refused, by name. */
Test(cache, a_duplicate_among_a_million_names_is_refused, .timeout = 90)
{
    char path[128], want[64];
    snprintf(path, sizeof path, "%s/dup-names.safetensors", dir);
    const int n = million();
    write_names(path, n, n / 2);
    snprintf(want, sizeof want, "tensor 't%d' appears twice", n / 2);
    expect_refused(path, want);
}

Test(cache, committed_fixtures)
{
    const char *data = getenv("TA_TEST_DATA");
    cr_assert_not_null(data, "TA_TEST_DATA not set (run through meson test)");
    char p[512];
    ta_cache_t *c = new_cache(MiB, TA_OVERFLOW_REFUSE);
    ta_entry_t *e;
    snprintf(p, sizeof p, "%s/tiny.safetensors", data);
    cr_assert_eq(ta_cache_load_safetensors(c, "tiny", p, &e), 0, "%s", cache_error());
    ta_tensor_t t;
    cr_assert_eq(ta_entry_tensor(e, "weight", &t), 0);
    cr_assert_eq(t.dtype, TA_DTYPE_F32);
    cr_assert_eq(t.ndim, 2);
    float expect[6] = {0, 1, 2, 3, 4, 5};
    cr_assert_arr_eq(t.data, expect, sizeof expect);
    cr_assert_eq(ta_entry_tensor(e, "bias", &t), 0);
    cr_assert_eq(t.dtype, TA_DTYPE_F16);
    ta_entry_unlock(e);
    snprintf(p, sizeof p, "%s/bad-overlap.safetensors", data);
    cr_assert_eq(ta_cache_load_safetensors(c, "o", p, &e), TA_EFORMAT);
    cr_assert(strstr(cache_error(), "overlap"), "%s", cache_error());
    snprintf(p, sizeof p, "%s/bad-truncated.safetensors", data);
    cr_assert_eq(ta_cache_load_safetensors(c, "t", p, &e), TA_EFORMAT);
    cr_assert(strstr(cache_error(), "out of range"), "%s", cache_error());
    cr_assert_eq(ta_cache_load_safetensors(c, "x", "/nonexistent/file", &e), ENOENT);
    ta_cache_destroy(c);
}

Test(cache, raw_files)
{
    char p[128];
    snprintf(p, sizeof p, "%s/raw.bin", dir);
    FILE *f = fopen(p, "wb");
    for (int i = 0; i < 4096; i++)
        fputc(i & 0xff, f);
    fclose(f);
    ta_cache_t *c = new_cache(MiB, TA_OVERFLOW_REFUSE);
    ta_entry_t *e;
    int64_t shape[2] = {32, 32};
    cr_assert_eq(ta_cache_load_raw(c, "r", p, TA_DTYPE_F32, 2, shape, &e), 0);
    ta_tensor_t t;
    cr_assert_eq(ta_entry_tensor(e, "data", &t), 0);
    cr_assert_eq(((unsigned char *)t.data)[4095], 0xff);
    ta_entry_unlock(e);
    int64_t wrong[1] = {100};
    cr_assert_eq(ta_cache_load_raw(c, "r2", p, TA_DTYPE_F32, 1, wrong, &e), TA_EFORMAT);
    cr_assert(strstr(cache_error(), "file is 4096 bytes, the shape needs 400"), "%s",
              cache_error());
    cr_assert_eq(cstats(c).in_cache, 1);
    ta_cache_destroy(c);
}

Test(cache, snapshot_diff_one_metric_per_line)
{
    ta_memory_snapshot_t a, b;
    ta_memory_snapshot(&a);
    void *p = ta_malloc(64 * MiB);
    memset(p, 1, 64 * MiB);
    ta_memory_snapshot(&b);
    cr_assert_geq(b.mapped - a.mapped, 64 * MiB);
    cr_assert_gt(b.rss, a.rss);
    char buf[1024];
    int n = ta_memory_snapshot_diff(&a, &b, buf, sizeof buf);
    cr_assert_gt(n, 0);
    int lines = 0;
    for (char *s = buf; *s; s++)
        lines += *s == '\n';
    cr_assert_eq(lines, 7, "%s", buf);
    cr_assert(strstr(buf, "Process RAM"), "%s", buf);
    cr_assert(strstr(buf, "tensoralloc mapped (large)     (+0.067)"), "%s", buf);
    ta_free(p);
}

Test(cache, loads_log_snapshot_diffs_at_debug)
{
    char path[128];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    write_st(path, "{\"w\":{\"dtype\":\"U8\",\"shape\":[3000000],\"data_offsets\":[0,3000000]}}",
             3000000);
    ta_cache_config_t cfg = {
        .size = sizeof cfg, .ram_budget = 8 * MiB, .log = capture_log, .log_level = TA_LOG_DEBUG};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    logged[0] = 0;
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors(c, "m", path, &e), 0);
    cr_assert(strstr(logged, "loaded 'm' from"), "%s", logged);
    cr_assert(strstr(logged, "GB/s"), "%s", logged);
    cr_assert(strstr(logged, "3:Process RAM"), "%s", logged);
    cr_assert(strstr(logged, "3:VRAM"), "%s", logged);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

/* ---- concurrency ----------------------------------------------------------------- */

static ta_cache_t *shared;
static char shared_dir[64];
static atomic_int conc_errors;

static void *worker(void *arg)
{
    uint64_t seed = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < 400; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        unsigned r = (unsigned)(seed >> 33);
        char key[16], path[128];
        snprintf(key, sizeof key, "m%u", r % 6);
        snprintf(path, sizeof path, "%s/m%u.safetensors", shared_dir, r % 6);
        ta_entry_t *e;
        int rc = ta_cache_get(shared, key, &e);
        if (rc == ENOENT) {
            rc = ta_cache_load_safetensors(shared, key, path, &e);
            if (rc == EEXIST || rc == TA_ECACHEFULL)
                continue;
        }
        if (rc) {
            atomic_fetch_add(&conc_errors, 1);
            continue;
        }
        ta_tensor_t t;
        if (ta_entry_tensor(e, "w", &t) != 0 ||
            ((unsigned char *)t.data)[t.nbytes - 1] != (unsigned char)(3 + (t.nbytes - 1) * 7))
            atomic_fetch_add(&conc_errors, 1);
        ta_entry_unlock(e);
        if (r % 5 == 0)
            ta_cache_remove(shared, key);
    }
    return NULL;
}

Test(cache, concurrent_gets_loads_and_evictions, .timeout = 120)
{
    strcpy(shared_dir, dir);
    for (int m = 0; m < 6; m++) {
        char path[128], hdr[200];
        size_t n = (size_t)(m + 1) * 300 * KiB;
        snprintf(path, sizeof path, "%s/m%d.safetensors", dir, m);
        snprintf(hdr, sizeof hdr,
                 "{\"w\":{\"dtype\":\"U8\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}}", n, n);
        write_st(path, hdr, n);
    }
    shared = new_cache(3 * MiB, TA_OVERFLOW_REFUSE);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(atomic_load(&conc_errors), 0);
    ta_cache_stats_t s = cstats(shared);
    cr_assert_leq(s.ram_used, 3 * MiB);
    cr_assert_gt(s.hits + s.misses, 1000);
    ta_cache_destroy(shared);
}

/* An entry made with ta_cache_create_entry is under construction until its
 * creator unlocks it: a get from another thread waits, then sees every
 * tensor. Before the fix the get returned the empty entry at once and the
 * getter read e->tensors while the builder's appends reallocated it
 * (AddressSanitizer: heap-use-after-free in ta_entry_tensor_at). */
enum { BUILT = 3000 };

typedef struct {
    ta_cache_t *c;
    pthread_barrier_t created;
    int get_rc;
    size_t seen; /* the tensor count at the get */
    size_t bad;  /* tensors missing or not filled */
    long reads;  /* tensor_at calls while the count was short */
} getter_t;

static void *get_while_built(void *arg)
{
    getter_t *g = arg;
    pthread_barrier_wait(&g->created); /* the entry exists, still empty */
    ta_entry_t *e;
    g->get_rc = ta_cache_get(g->c, "built", &e);
    if (g->get_rc)
        return NULL;
    g->seen = ta_entry_tensor_count(e);
    /* a half-built entry: read it while it grows (for 2 s at most) */
    time_t until = time(NULL) + 2;
    while (ta_entry_tensor_count(e) < BUILT && time(NULL) < until) {
        size_t n = ta_entry_tensor_count(e);
        for (size_t i = 0; i < n; i++) {
            ta_tensor_t t;
            g->reads++;
            if (ta_entry_tensor_at(e, i, &t) != 0 || t.nbytes != sizeof(uint64_t))
                g->bad++;
        }
    }
    for (size_t i = 0; i < BUILT; i++) {
        ta_tensor_t t;
        if (ta_entry_tensor_at(e, i, &t) != 0 || *(const uint64_t *)t.data != i)
            g->bad++;
    }
    ta_entry_unlock(e);
    return NULL;
}

Test(cache, a_get_never_sees_an_entry_under_construction, .timeout = 60)
{
    getter_t g = {.c = new_cache(64 * MiB, TA_OVERFLOW_REFUSE)};
    pthread_barrier_init(&g.created, NULL, 2);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_create_entry(g.c, "built", &e), 0, "%s", cache_error());
    pthread_t tid;
    cr_assert_eq(pthread_create(&tid, NULL, get_while_built, &g), 0);
    pthread_barrier_wait(&g.created);
    usleep(50 * 1000); /* the getter is at its get by now */
    int add_rc = 0;
    for (size_t i = 0; i < BUILT && add_rc == 0; i++) {
        char name[32];
        snprintf(name, sizeof name, "t%zu", i);
        int64_t shape[1] = {1};
        void *data;
        if ((add_rc = ta_entry_add_tensor(e, name, TA_DTYPE_U64, 1, shape, &data)) == 0)
            *(uint64_t *)data = i;
        if (i % 64 == 0)
            sched_yield(); /* let a reader of a half-built entry in */
    }
    bool listed = ta_cache_contains(g.c, "built");
    ta_entry_t *mine = NULL;
    int own_get = ta_cache_get(g.c, "built", &mine); /* must not wait for itself */
    if (own_get == 0)
        ta_entry_unlock(mine);
    ta_entry_unlock(e); /* complete: the getter goes on */
    pthread_join(tid, NULL);
    pthread_barrier_destroy(&g.created);
    cr_assert_eq(add_rc, 0, "%s", cache_error());
    cr_assert_eq(g.get_rc, 0);
    cr_assert_eq(g.seen, BUILT, "the get saw %zu of %d tensors (%ld reads of a half-built entry)",
                 g.seen, BUILT, g.reads);
    cr_assert_eq(g.bad, 0, "%zu tensors missing or unfilled", g.bad);
    cr_assert(listed, "an entry under construction is in the cache (contains, EEXIST)");
    cr_assert_eq(own_get, EDEADLK, "the builder's own get: rc %d", own_get);
    cr_assert(strstr(cache_error(), "under construction"), "%s", cache_error());
    /* complete: tensors are added while an entry is built, never after */
    cr_assert_eq(ta_cache_get(g.c, "built", &e), 0);
    int64_t shape[1] = {1};
    void *data;
    cr_assert_eq(ta_entry_add_tensor(e, "late", TA_DTYPE_U8, 1, shape, &data), EINVAL);
    cr_assert(strstr(cache_error(), "complete"), "%s", cache_error());
    cr_assert_eq(ta_entry_tensor_count(e), BUILT);
    ta_entry_unlock(e);
    ta_cache_stats_t s = cstats(g.c);
    cr_assert_eq(s.ram_used, BUILT * sizeof(uint64_t));
    ta_cache_destroy(g.c);
}

/* ---- device moves, against the CUDA test double ------------------------------ */

/* The device tests run against the CUDA test double. */
static void use_fake_cudart(void)
{
    const char *fake = getenv("FAKE_CUDART_PATH");
    if (fake == NULL)
        cr_skip_test("no CUDA staging in this build (-Dcuda=disabled): device moves untested");
    setenv("TENSORALLOC_CUDART", fake, 1);
}

Test(cache, device_moves_respect_the_vram_budget)
{
    use_fake_cudart();
    ta_cache_config_t cfg = {
        .size = sizeof cfg, .ram_budget = 16 * MiB, .vram_budget = 3 * MiB, .keep_ram_copy = false};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    cr_assert_eq(put(c, "a", 2 * MiB, 0x11), 0);
    cr_assert_eq(put(c, "b", 2 * MiB, 0x22), 0);
    ta_entry_t *a, *b;
    cr_assert_eq(ta_cache_get(c, "a", &a), 0);
    cr_assert_eq(ta_entry_to_device(a), 0, "%s", cache_error());
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.vram_used, 2 * MiB);
    cr_assert_eq(s.ram_used, 2 * MiB, "no RAM copy kept: a's host bytes were freed");
    ta_tensor_t t;
    ta_entry_tensor(a, "w", &t);
    cr_assert_null(t.data);
    cr_assert_not_null(t.device_data);
    /* while a is locked, b cannot get VRAM */
    cr_assert_eq(ta_cache_get(c, "b", &b), 0);
    cr_assert_eq(ta_entry_to_device(b), TA_ECACHEFULL);
    ta_entry_unlock(a);
    /* now a is unlocked and has no host copy: it is evicted whole */
    cr_assert_eq(ta_entry_to_device(b), 0, "%s", cache_error());
    cr_assert_not(present(c, "a"));
    /* and back: the host copy is made again, data intact */
    cr_assert_eq(ta_entry_to_host(b), 0, "%s", cache_error());
    ta_entry_tensor(b, "w", &t);
    cr_assert_not_null(t.data);
    cr_assert_null(t.device_data);
    cr_assert_eq(((unsigned char *)t.data)[2 * MiB - 1], 0x22);
    s = cstats(c);
    cr_assert_eq(s.vram_used, 0);
    cr_assert_eq(s.ram_used, 2 * MiB);
    cr_assert_eq(s.device_moves, 3);
    ta_entry_unlock(b);
    ta_cache_destroy(c);
}

Test(cache, device_moves_keep_ram_copy_and_evict_device_copies_lru)
{
    use_fake_cudart();
    ta_cache_config_t cfg = {
        .size = sizeof cfg, .ram_budget = 16 * MiB, .vram_budget = 4 * MiB, .keep_ram_copy = true};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    const char *keys[] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(put(c, keys[i], 2 * MiB, i + 1), 0);
        ta_entry_t *e;
        cr_assert_eq(ta_cache_get(c, keys[i], &e), 0);
        cr_assert_eq(ta_entry_to_device(e), 0, "%s", cache_error());
        ta_entry_unlock(e);
    }
    /* a's device copy went for c's; a itself stays (it has a host copy) */
    ta_entry_t *a;
    cr_assert_eq(ta_cache_get(c, "a", &a), 0);
    cr_assert_eq(ta_entry_vram_bytes(a), 0);
    cr_assert_eq(ta_entry_ram_bytes(a), 2 * MiB);
    ta_entry_unlock(a);
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.vram_used, 4 * MiB);
    cr_assert_eq(s.ram_used, 6 * MiB);
    ta_cache_destroy(c);
}

Test(cache, device_moves_fail_cleanly_without_a_gpu)
{
    setenv("TENSORALLOC_CUDART", "/nonexistent/libcudart.so", 1);
    ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = 4 * MiB, .vram_budget = MiB};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    cr_assert_eq(put(c, "a", MiB, 1), 0);
    ta_entry_t *a;
    cr_assert_eq(ta_cache_get(c, "a", &a), 0);
    int rc = ta_entry_to_device(a);
    cr_assert(rc == TA_ENORUNTIME || rc == TA_ENOTSUP, "rc %d", rc);
    ta_tensor_t t;
    ta_entry_tensor(a, "w", &t);
    cr_assert_eq(((unsigned char *)t.data)[0], 1, "the entry is untouched");
    ta_entry_unlock(a);
    ta_cache_destroy(c);
}

/* Holders of one entry that move it at once: the moves are serialised
 * (one VRAM reservation, one set of device copies), and the host copy that
 * keep_ram_copy = false gives up stays readable until the last holder
 * unlocks. Before the fix both threads reserved VRAM, the second overwrote
 * the first's device pointers, and the host data was freed under readers. */
enum { MOVERS = 4 };
static pthread_barrier_t movers_ready;

static void *move_and_read(void *arg)
{
    ta_cache_t *c = arg;
    ta_entry_t *e;
    if (ta_cache_get(c, "m", &e) != 0)
        return (void *)1;
    ta_tensor_t t;
    ta_entry_tensor(e, "w", &t);
    const unsigned char *host = t.data; /* read after the moves, while still locked */
    pthread_barrier_wait(&movers_ready);
    int rc = ta_entry_to_device(e);
    size_t bad = 0;
    for (size_t i = 0; i < 4 * MiB; i += 4096)
        bad += host[i] != 0x6b;
    pthread_barrier_wait(&movers_ready); /* everyone has read before anyone unlocks */
    ta_entry_unlock(e);
    return (void *)(uintptr_t)(rc != 0 || bad != 0);
}

Test(cache, concurrent_moves_of_one_entry_are_serialised)
{
    use_fake_cudart();
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 64 * MiB,
                             .vram_budget = 64 * MiB,
                             .keep_ram_copy = false};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    for (int round = 0; round < 20; round++) {
        cr_assert_eq(put(c, "m", 4 * MiB, 0x6b), 0);
        pthread_barrier_init(&movers_ready, NULL, MOVERS);
        pthread_t tid[MOVERS];
        for (int i = 0; i < MOVERS; i++)
            cr_assert_eq(pthread_create(&tid[i], NULL, move_and_read, c), 0);
        for (int i = 0; i < MOVERS; i++) {
            void *bad;
            pthread_join(tid[i], &bad);
            cr_assert_null(bad, "round %d: a mover failed or read freed host data", round);
        }
        pthread_barrier_destroy(&movers_ready);
        ta_cache_stats_t s = cstats(c);
        cr_assert_eq(s.vram_used, 4 * MiB, "round %d: VRAM charged %" PRIu64, round, s.vram_used);
        cr_assert_eq(s.ram_used, 0, "the host copy goes with the last holder");
        cr_assert_eq(s.device_moves, 2 * (uint64_t)round + 1, "one move to the device per round");
        ta_entry_t *e;
        cr_assert_eq(ta_cache_get(c, "m", &e), 0);
        ta_tensor_t t;
        ta_entry_tensor(e, "w", &t);
        cr_assert_null(t.data);
        cr_assert_not_null(t.device_data);
        cr_assert_eq(ta_entry_to_host(e), 0, "%s", cache_error());
        ta_entry_tensor(e, "w", &t);
        cr_assert_eq(((unsigned char *)t.data)[4 * MiB - 1], 0x6b);
        ta_entry_unlock(e);
        cr_assert_eq(ta_cache_remove(c, "m"), 0);
    }
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.vram_used, 0);
    ta_cache_destroy(c);
}

/* ---- loads: readers, direct I/O, bad files and faults ---------------------- */

#define MANY_MAX 512
static uint64_t many_offsets[MANY_MAX]; /* data offset of tensor "t<i>" */

/* A file of n tensors (n < MANY_MAX, not a multiple of 7) of 1 B to about
 * 3 MiB, named "t<i>" out of file order. */
static void write_many(const char *path, int n)
{
    char *hdr = malloc((size_t)n * 96 + 16);
    cr_assert_not_null(hdr);
    uint64_t s = 12345, off = 0;
    int len = sprintf(hdr, "{");
    for (int k = 0; k < n; k++) {
        int i = (k * 7) % n;
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        uint64_t bytes = 1 + (s >> 33) % ((k % 5 == 0) ? 3 * MiB : 8192);
        len += sprintf(hdr + len,
                       "%s\"t%d\":{\"dtype\":\"U8\",\"shape\":[%llu],"
                       "\"data_offsets\":[%llu,%llu]}",
                       k ? "," : "", i, (unsigned long long)bytes, (unsigned long long)off,
                       (unsigned long long)(off + bytes));
        many_offsets[i] = off;
        off += bytes;
    }
    strcpy(hdr + len, "}");
    write_st(path, hdr, (size_t)off);
    free(hdr);
}

/* write_many into the suite's folder; the path stays valid for the test. */
static const char *many_file(int n)
{
    static char path[128];
    snprintf(path, sizeof path, "%s/many.safetensors", dir);
    write_many(path, n);
    return path;
}

/* Every tensor of e holds its own bytes of the file (data byte x is 3 + 7x). */
static void expect_file_bytes(ta_entry_t *e)
{
    ta_tensor_t t;
    size_t i;
    for (i = 0; ta_entry_tensor_at(e, i, &t) == 0; i++) {
        int k = atoi(t.name + 1);
        cr_assert(k >= 0 && k < MANY_MAX);
        const unsigned char *p = t.data;
        for (size_t x = 0; x < t.nbytes; x++)
            if (p[x] != (unsigned char)(3 + 7 * (many_offsets[k] + x)))
                cr_assert_fail("tensor %s byte %zu: %u", t.name, x, p[x]);
    }
    cr_assert_gt(i, 0);
}

typedef struct {
    ta_cache_t *c;
    char log[8192];
    pthread_mutex_t mu; /* the file guard's thread logs too */
} logged_cache_t;

static void keep_log(void *arg, ta_log_level_t level, const char *msg)
{
    (void)level;
    logged_cache_t *lc = arg;
    pthread_mutex_lock(&lc->mu);
    size_t n = strlen(lc->log);
    snprintf(lc->log + n, sizeof lc->log - n, "%s\n", msg);
    pthread_mutex_unlock(&lc->mu);
}

/* Whether what appears in the log within two seconds: the file guard's
 * thread reports after it has marked the entry (with no lock held), so a
 * get can see the mark before the message is written. */
static bool log_shows(logged_cache_t *lc, const char *what)
{
    for (int i = 0; i < 200; i++) {
        pthread_mutex_lock(&lc->mu);
        bool found = strstr(lc->log, what) != NULL;
        pthread_mutex_unlock(&lc->mu);
        if (found)
            return true;
        usleep(10 * 1000);
    }
    return false;
}

static logged_cache_t *load_cache(int threads, size_t chunk, ta_page_cache_t pc)
{
    logged_cache_t *lc = calloc(1, sizeof *lc);
    pthread_mutex_init(&lc->mu, NULL);
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 256 * MiB,
                             .log = keep_log,
                             .log_arg = lc,
                             .log_level = TA_LOG_INFO,
                             .load_threads = threads,
                             .load_chunk = chunk,
                             .page_cache = pc};
    cr_assert_eq(ta_cache_create(&cfg, &lc->c), 0);
    return lc;
}

static void loaded_and_checked(logged_cache_t *lc, const char *path, const char *key,
                               const char *needle)
{
    ta_entry_t *e;
    lc->log[0] = '\0';
    cr_assert_eq(ta_cache_load_safetensors(lc->c, key, path, &e), 0, "%s", cache_error());
    expect_file_bytes(e);
    cr_assert(strstr(lc->log, needle), "log '%s' lacks '%s'", lc->log, needle);
    ta_entry_unlock(e);
    cr_assert_eq(ta_cache_remove(lc->c, key), 0);
}

Test(cache, loads_with_several_readers_and_every_page_cache_mode)
{
    const char *path = many_file(251);
    /* 64 KiB chunks: the big tensors are cut into many reads */
    for (int threads = 1; threads <= 4; threads *= 2) {
        char needle[32];
        snprintf(needle, sizeof needle, "%d reader%s", threads, threads > 1 ? "s" : "");
        for (int pc = TA_PAGE_CACHE_KEEP; pc < TA_PAGE_CACHE_COUNT_; pc++) {
            logged_cache_t *lc = load_cache(threads, 64 * KiB, (ta_page_cache_t)pc);
            loaded_and_checked(lc, path, "m", needle);
            if (pc == TA_PAGE_CACHE_BYPASS) /* /tmp takes O_DIRECT; tmpfs too since 6.6 */
                cr_assert(strstr(lc->log, "O_DIRECT") || strncmp(dir, "/tmp", 4) != 0, "%s",
                          lc->log);
            ta_cache_destroy(lc->c);
            free(lc);
        }
    }
}

Test(cache, direct_loads_fall_back_where_the_filesystem_refuses)
{
    const char *path = many_file(101);
    logged_cache_t *lc = load_cache(2, 0, TA_PAGE_CACHE_BYPASS);
    _ta_os_refuse_direct(1);
    loaded_and_checked(lc, path, "m", "2 readers");
    _ta_os_refuse_direct(0);
    cr_assert_null(strstr(lc->log, "O_DIRECT"), "%s", lc->log);
    ta_cache_destroy(lc->c);
    free(lc);
}

Test(cache, loads_on_tmpfs)
{
    char shm[] = "/dev/shm/ta-load-XXXXXX";
    if (mkdtemp(shm) == NULL) {
        cr_skip_test("no /dev/shm (tmpfs) here: %s", strerror(errno));
    }
    char path[128];
    snprintf(path, sizeof path, "%s/many.safetensors", shm);
    write_many(path, 101);
    for (int pc = TA_PAGE_CACHE_KEEP; pc < TA_PAGE_CACHE_COUNT_; pc++) {
        logged_cache_t *lc = load_cache(2, 256 * KiB, (ta_page_cache_t)pc);
        loaded_and_checked(lc, path, "m", pc == TA_PAGE_CACHE_MAP ? "mapped 'm'" : "loaded 'm'");
        ta_cache_destroy(lc->c);
        free(lc);
    }
    unlink(path);
    rmdir(shm);
}

/* Lines of /proc/self/maps: one per mapping. */
static int mapping_count(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    cr_assert_not_null(f);
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF)
        n += ch == '\n';
    fclose(f);
    return n;
}

/* A file mapping from 2 MiB up starts on a huge-page boundary. Where the
 * kernel does not place it there itself (tmpfs here) it goes into an
 * aligned reservation, whose slack must go back whole even for a length
 * that is not a multiple of pages (the cache maps up to the last tensor's
 * end): before, each such mapping left a mapping of slack behind. */
Test(cache, file_mappings_are_aligned_and_leave_no_slack)
{
    char shm[] = "/dev/shm/ta-map-XXXXXX";
    if (mkdtemp(shm) == NULL)
        cr_skip_test("no /dev/shm (tmpfs) here: %s", strerror(errno));
    char path[128];
    snprintf(path, sizeof path, "%s/f", shm);
    const size_t size = 3 * MiB + 100;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, (off_t)size), 0);
    int before = mapping_count();
    for (int i = 0; i < 20; i++) {
        void *pad = NULL, *p = NULL;
        cr_assert_eq(_ta_os_map(4096 * (size_t)(i + 1), 4096, &pad), 0); /* vary the placement */
        cr_assert_eq(_ta_os_map_file(fd, size, &p), 0);
        cr_assert_eq((uintptr_t)p % (2 * MiB), 0, "mapping %d at %p", i, p);
        cr_assert_eq(_ta_os_unmap(p, size), 0);
        cr_assert_eq(_ta_os_unmap(pad, 4096 * (size_t)(i + 1)), 0);
    }
    cr_assert_eq(mapping_count(), before, "mappings left behind");
    close(fd);
    unlink(path);
    rmdir(shm);
}

/* The read hook: what the test does to the nth read of the data section. */
typedef struct {
    _Atomic long reads;
    long at;            /* the read it acts on (1 = the first data read) */
    int err;            /* fail it with this */
    bool shorten;       /* every data read returns a third */
    const char *shrink; /* truncate this file to half before that read */
    uint64_t data_start;
} hook_t;

static int on_read(void *arg, int fd, size_t *len, uint64_t off)
{
    (void)fd;
    hook_t *h = arg;
    if (off < h->data_start)
        return 0; /* the header */
    long n = atomic_fetch_add(&h->reads, 1) + 1;
    if (h->shorten && *len > 3)
        *len = *len / 3;
    if (n == h->at && h->shrink) {
        struct stat st;
        cr_assert_eq(stat(h->shrink, &st), 0);
        cr_assert_eq(truncate(h->shrink, st.st_size / 2), 0);
    }
    return n == h->at ? h->err : 0;
}

static uint64_t data_start_of(const char *path)
{
    FILE *f = fopen(path, "rb");
    unsigned char len8[8];
    cr_assert_eq(fread(len8, 1, 8, f), 8);
    fclose(f);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | len8[i];
    return 8 + n;
}

/* A load that fails part way leaves the cache as it was (nothing had to be
 * evicted: the budget has room) and frees every tensor it had made. */
static void expect_failed_load(const char *path, hook_t *h, ta_page_cache_t pc, int want_rc,
                               const char *needle)
{
    logged_cache_t *lc = load_cache(2, 64 * KiB, pc);
    cr_assert_eq(put(lc->c, "keep", MiB, 5), 0);
    ta_cache_stats_t before = cstats(lc->c);
    ta_stats_t heap_before = stats_now();
    h->data_start = data_start_of(path);
    atomic_store(&h->reads, 0);
    _ta_os_set_read_hook(on_read, h);
    ta_entry_t *e = NULL;
    int rc = ta_cache_load_safetensors(lc->c, "m", path, &e);
    _ta_os_set_read_hook(NULL, NULL);
    cr_assert_eq(rc, want_rc, "rc %d (%s)", rc, cache_error());
    cr_assert(strstr(cache_error(), needle), "'%s' lacks '%s'", cache_error(), needle);
    cr_assert_null(e);
    ta_cache_stats_t after = cstats(lc->c);
    cr_assert_eq(after.in_cache, before.in_cache);
    cr_assert_eq(after.ram_used, before.ram_used);
    cr_assert_eq(after.loads, before.loads);
    cr_assert_eq(after.cleared, before.cleared);
    cr_assert(present(lc->c, "keep"));
    cr_assert_not(present(lc->c, "m"));
    ta_stats_t heap_after = stats_now();
    cr_assert_eq(heap_after.large_live_bytes, heap_before.large_live_bytes,
                 "large blocks leaked: %llu -> %llu",
                 (unsigned long long)heap_before.large_live_bytes,
                 (unsigned long long)heap_after.large_live_bytes);
    ta_cache_destroy(lc->c);
    free(lc);
}

Test(cache, a_read_error_part_way_fails_the_load_cleanly)
{
    const char *path = many_file(101);
    for (int pc = TA_PAGE_CACHE_KEEP; pc <= TA_PAGE_CACHE_BYPASS; pc += 2) {
        hook_t h = {.at = 9, .err = EIO};
        expect_failed_load(path, &h, (ta_page_cache_t)pc, EIO, "read failed at offset");
        cr_assert_geq(atomic_load(&h.reads), 9);
    }
}

Test(cache, a_file_that_shrinks_during_the_load_is_refused)
{
    for (int pc = TA_PAGE_CACHE_KEEP; pc <= TA_PAGE_CACHE_BYPASS; pc += 2) {
        const char *path = many_file(101);
        hook_t h = {.at = 2, .shrink = path};
        expect_failed_load(path, &h, (ta_page_cache_t)pc, TA_EFORMAT, "shrank during the load");
    }
}

Test(cache, short_reads_are_carried_on)
{
    const char *path = many_file(101);
    hook_t h = {.shorten = true, .data_start = data_start_of(path)};
    logged_cache_t *lc = load_cache(2, 64 * KiB, TA_PAGE_CACHE_KEEP);
    _ta_os_set_read_hook(on_read, &h);
    loaded_and_checked(lc, path, "m", "2 readers");
    _ta_os_set_read_hook(NULL, NULL);
    cr_assert_gt(atomic_load(&h.reads), 400, "%ld reads", atomic_load(&h.reads));
    ta_cache_destroy(lc->c);
    free(lc);
}

/* The legacy direct-I/O path (and NFS): a direct read whose offset or
 * length is not a multiple of the block is refused with EINVAL. The hook
 * plays that filesystem, and cuts every other direct read short at a block
 * boundary (a read cut by a signal, or NFS's rsize). */
typedef struct {
    _Atomic long direct, longer, shortened, unaligned;
    _Atomic uint64_t unaligned_at;
} legacy_direct_t;

static int legacy_direct(void *arg, int fd, size_t *len, uint64_t off)
{
    legacy_direct_t *h = arg;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || !(flags & O_DIRECT))
        return 0; /* buffered: the header, or a load that fell back */
    atomic_fetch_add(&h->direct, 1);
    if (off % 4096 || *len % 4096) {
        if (atomic_fetch_add(&h->unaligned, 1) == 0)
            atomic_store(&h->unaligned_at, off);
        return EINVAL;
    }
    if (*len > 4096 && atomic_fetch_add(&h->longer, 1) % 2 == 0) {
        *len = *len / 2 & ~(size_t)4095;
        atomic_fetch_add(&h->shortened, 1);
    }
    return 0;
}

/* A direct read that comes back short goes on at an aligned offset. The
 * file ends inside a block, so the last direct read of every load is short
 * there: before the fix the loader went on at the unaligned end of what it
 * got (EINVAL on such filesystems: "read failed at offset N"; ext4 answers
 * 0 there, which hid it). */
Test(cache, direct_reads_stay_aligned_after_a_short_read)
{
    const char *path = many_file(101);
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    cr_assert_neq(st.st_size % 4096, 0, "the file must end inside a block");
    for (int threads = 1; threads <= 4; threads *= 4) {
        legacy_direct_t h = {0};
        logged_cache_t *lc = load_cache(threads, 64 * KiB, TA_PAGE_CACHE_BYPASS);
        _ta_os_set_read_hook(legacy_direct, &h);
        ta_entry_t *e = NULL;
        lc->log[0] = '\0';
        int rc = ta_cache_load_safetensors(lc->c, "m", path, &e);
        _ta_os_set_read_hook(NULL, NULL);
        cr_assert_eq(rc, 0, "%d reader(s): %s", threads, cache_error());
        if (!strstr(lc->log, "O_DIRECT"))
            cr_skip_test("no O_DIRECT in %s: %s", dir, lc->log);
        expect_file_bytes(e);
        ta_entry_unlock(e);
        cr_assert_eq(atomic_load(&h.unaligned), 0, "%ld unaligned direct reads, the first at %llu",
                     atomic_load(&h.unaligned), (unsigned long long)atomic_load(&h.unaligned_at));
        cr_assert_gt(atomic_load(&h.shortened), 10, "%ld", atomic_load(&h.shortened));
        cr_log_info("%d reader(s): %ld direct reads, %ld cut short", threads,
                    atomic_load(&h.direct), atomic_load(&h.shortened));
        ta_cache_destroy(lc->c);
        free(lc);
    }
    /* the same loader streams a load straight to the device */
    if (getenv("FAKE_CUDART_PATH") == NULL)
        return;
    use_fake_cudart();
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 64 * MiB,
                             .vram_budget = 64 * MiB,
                             .load_threads = 2,
                             .load_chunk = 64 * KiB,
                             .page_cache = TA_PAGE_CACHE_BYPASS};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0, "%s", cache_error());
    legacy_direct_t h = {0};
    _ta_os_set_read_hook(legacy_direct, &h);
    ta_entry_t *e = NULL;
    int rc = ta_cache_load_safetensors_to_device(c, "m", path, &e);
    _ta_os_set_read_hook(NULL, NULL);
    cr_assert_eq(rc, 0, "to the device: %s", cache_error());
    cr_assert_eq(atomic_load(&h.unaligned), 0, "to the device: %ld unaligned direct reads",
                 atomic_load(&h.unaligned));
    cr_assert_gt(atomic_load(&h.direct), 0);
    cr_assert_eq(ta_entry_to_host(e), 0, "%s", cache_error());
    expect_file_bytes(e);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

Test(cache, a_reader_that_cannot_start_leaves_fewer_readers)
{
    const char *path = many_file(101);
    logged_cache_t *lc = load_cache(4, 64 * KiB, TA_PAGE_CACHE_KEEP);
    _ta_os_fail_nth_thread(2); /* the first reader starts, the second does not */
    loaded_and_checked(lc, path, "m", "2 readers");
    _ta_os_fail_nth_thread(0);
    ta_cache_destroy(lc->c);
    free(lc);
}

Test(cache, each_load_is_recorded_in_the_statistics)
{
    const char *path = many_file(101);
    logged_cache_t *lc = load_cache(2, 0, TA_PAGE_CACHE_KEEP);
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    uint64_t data = (uint64_t)st.st_size - data_start_of(path);
    for (int i = 0; i < TA_CACHE_RECENT_LOADS + 3; i++) {
        char key[16];
        snprintf(key, sizeof key, "k%d", i);
        loaded_and_checked(lc, path, key, "2 readers");
    }
    ta_cache_stats_t s = cstats(lc->c);
    cr_assert_eq(s.version, 4);
    cr_assert_eq(s.mapped_loads, 0);
    cr_assert_eq(s.last_load_bytes, data);
    cr_assert_gt(s.last_load_seconds, 0);
    cr_assert_eq(s.last_load_readers, 2);
    cr_assert_eq(s.last_load_direct, 0);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    cr_assert_eq(ta_cache_stats_json(lc->c, f), 0);
    fclose(f);
    /* the last 16 of 19 loads, oldest first */
    cr_assert_null(strstr(text, "\"key\": \"k2\""), "%s", text);
    const char *first = strstr(text, "\"key\": \"k3\""), *last = strstr(text, "\"key\": \"k18\"");
    cr_assert(first && last && first < last, "%s", text);
    char want[64];
    snprintf(want, sizeof want, "\"bytes\": %llu, \"seconds\": ", (unsigned long long)data);
    cr_assert(strstr(last, want), "%s", text);
    cr_assert(strstr(last, "\"readers\": 2, \"direct\": false}]}"), "%s", text);
    free(text);
    ta_cache_destroy(lc->c);
    free(lc);
}

Test(cache, a_budget_of_zero_follows_the_rule)
{
    const size_t GiB = (size_t)1 << 30;
    cr_assert_eq(ta_cache_budget_rule(24 * GiB, 0, 0), 10 * GiB);  /* half less 2 GiB */
    cr_assert_eq(ta_cache_budget_rule(512 * GiB, 0, 0), 32 * GiB); /* capped without a device */
    cr_assert_eq(ta_cache_budget_rule(512 * GiB, 80 * GiB, 3 * GiB), 77 * GiB); /* VRAM - working */
    cr_assert_eq(ta_cache_budget_rule(64 * GiB, 24 * GiB, 3 * GiB), 21 * GiB);
    cr_assert_eq(ta_cache_budget_rule(10 * GiB, 0, 0), 4 * GiB); /* the floor */
    cr_assert_eq(ta_cache_budget_rule(6 * GiB, 0, 0), 3 * GiB);  /* never over half */
    /* 0: this machine's memory, or the cgroup's limit where lower */
    size_t mem = _ta_os_physical_memory(), limit = _ta_os_cgroup_memory_limit();
    if (limit && limit < mem)
        mem = limit;
    ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = 0};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0, "%s", cache_error());
    cr_assert_eq(cstats(c).ram_budget, ta_cache_budget_rule(mem, 0, 0));
    cr_assert_eq(ta_cache_budget_rule(0, 0, 0), ta_cache_budget_rule(mem, 0, 0));
    cr_log_info("this machine: %zu MiB of memory (cgroup limit %zu MiB): a %zu MiB budget",
                mem >> 20, limit >> 20, (size_t)cstats(c).ram_budget >> 20);
    ta_cache_destroy(c);
    cfg.load_threads = -1;
    cr_assert_eq(ta_cache_create(&cfg, &c), EINVAL);
    cfg.load_threads = 0;
    cfg.page_cache = TA_PAGE_CACHE_COUNT_;
    cr_assert_eq(ta_cache_create(&cfg, &c), EINVAL);
}

Test(cache, keep_alive_evicts_entries_left_unused)
{
    ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = 64 * MiB, .keep_alive_ms = 500};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0, "%s", cache_error());
    cr_assert_eq(put(c, "idle", MiB, 1), 0);
    cr_assert_eq(put(c, "used", MiB, 2), 0);
    ta_entry_t *held;
    cr_assert_eq(put(c, "held", MiB, 3), 0);
    cr_assert_eq(ta_cache_get(c, "held", &held), 0);
    /* "used" is touched every 100 ms, "held" stays locked: only "idle" goes */
    for (int i = 0; i < 12; i++) {
        usleep(100 * 1000);
        ta_entry_t *e;
        cr_assert_eq(ta_cache_get(c, "used", &e), 0);
        ta_entry_unlock(e);
    }
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.expired, 1);
    cr_assert_eq(s.in_cache, 2);
    cr_assert_eq(s.ram_used, 2 * MiB);
    cr_assert(present(c, "used"));
    cr_assert(present(c, "held"));
    /* an unlocked entry goes within keep_alive_ms (and the timer's slack) */
    ta_entry_unlock(held);
    usleep(1500 * 1000);
    s = cstats(c);
    cr_assert_eq(s.expired, 3, "%llu expired", (unsigned long long)s.expired);
    cr_assert_eq(s.in_cache, 0);
    cr_assert_eq(s.ram_used, 0);
    ta_cache_destroy(c);
}

Test(cache, a_keep_alive_timer_that_cannot_start_fails_the_create)
{
    ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = MiB, .keep_alive_ms = 100};
    ta_cache_t *c = NULL;
    _ta_os_fail_nth_thread(1);
    cr_assert_eq(ta_cache_create(&cfg, &c), EAGAIN);
    _ta_os_fail_nth_thread(0);
    cr_assert(strstr(cache_error(), "keep-alive"), "%s", cache_error());
}

/* Every option of ta_cache_create is checked: a bad value is refused with
 * EINVAL and a message naming the field, and nothing is created. Before,
 * load_chunk = SIZE_MAX was accepted, rounded up to 4 KiB as 0, and the
 * first load divided by it (SIGFPE); load_chunk * 4 (a staging chunk)
 * overflowed for anything above SIZE_MAX / 4. */
static void expect_bad_option(ta_cache_config_t cfg, const char *field)
{
    ta_cache_t *c = NULL;
    int rc = ta_cache_create(&cfg, &c);
    cr_assert_eq(rc, EINVAL, "%s: rc %d, expected EINVAL", field, rc);
    cr_assert_null(c, "%s: a cache was made", field);
    const char *message;
    cr_assert_eq(ta_cache_last_error(&message), EINVAL);
    cr_assert(strstr(message, field), "%s: message '%s' does not name it", field, message);
    if (c)
        ta_cache_destroy(c);
}

static void expect_good_option(ta_cache_config_t cfg, const char *field)
{
    ta_cache_t *c = NULL;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0, "%s: %s", field, cache_error());
    ta_cache_destroy(c);
}

Test(cache, every_bad_option_is_refused_by_name)
{
    const ta_cache_config_t ok = {.size = sizeof ok, .ram_budget = MiB};
    ta_cache_t *c = NULL;
    cr_assert_eq(ta_cache_create(NULL, &c), EINVAL);
    cr_assert_eq(ta_cache_create(&ok, NULL), EINVAL);
    ta_cache_config_t cfg = ok;
    const size_t chunks[] = {SIZE_MAX, SIZE_MAX - 4095, SIZE_MAX / 4 + 1,
                             TA_CACHE_MAX_LOAD_CHUNK + 1};
    for (size_t i = 0; i < sizeof chunks / sizeof *chunks; i++) {
        cfg.load_chunk = chunks[i];
        expect_bad_option(cfg, "load_chunk");
    }
    cfg = ok;
    cfg.size = 0;
    expect_bad_option(cfg, "size");
    cfg.size = offsetof(ta_cache_config_t, log) - 1;
    expect_bad_option(cfg, "size");
    cfg.size = sizeof cfg + 8; /* a newer caller's fields would be ignored */
    expect_bad_option(cfg, "size");
    cfg = ok;
    cfg.overflow = (ta_overflow_t)2;
    expect_bad_option(cfg, "overflow");
    cfg = ok;
    cfg.device = -1;
    expect_bad_option(cfg, "device");
    cfg = ok;
    cfg.log_level = (ta_log_level_t)(TA_LOG_DEBUG + 1);
    expect_bad_option(cfg, "log_level");
    cfg.log_level = (ta_log_level_t)-1;
    expect_bad_option(cfg, "log_level");
    cfg = ok;
    cfg.load_threads = -1;
    expect_bad_option(cfg, "load_threads");
    cfg = ok;
    cfg.page_cache = TA_PAGE_CACHE_COUNT_;
    expect_bad_option(cfg, "page_cache");
    cfg = ok;
    cfg.keep_alive_ms = UINT64_MAX;
    expect_bad_option(cfg, "keep_alive_ms");
    cfg.keep_alive_ms = TA_CACHE_MAX_KEEP_ALIVE_MS + 1;
    expect_bad_option(cfg, "keep_alive_ms");
    cfg = ok;
    cfg.pressure = (ta_cache_pressure_t)2;
    expect_bad_option(cfg, "pressure");
    cfg = ok;
    cfg.pressure_calm_ms = TA_CACHE_MAX_PRESSURE_CALM_MS + 1;
    expect_bad_option(cfg, "pressure_calm_ms");
    /* the limits themselves are accepted, and so are the largest budgets */
    cfg = ok;
    cfg.load_chunk = TA_CACHE_MAX_LOAD_CHUNK;
    cfg.keep_alive_ms = TA_CACHE_MAX_KEEP_ALIVE_MS;
    expect_good_option(cfg, "the largest load_chunk and keep_alive_ms");
    cfg = ok;
    cfg.ram_budget = cfg.vram_budget = cfg.device_working_mem = SIZE_MAX;
    cfg.load_threads = 1000; /* more than TA_LOAD_MAX_THREADS: that many run */
    expect_good_option(cfg, "the largest budgets");
}

/* The smallest chunk loads (rounded up to 4 KiB), and the loader itself
 * refuses a chunk it cannot round (it divided by 0 before). */
Test(cache, load_chunks_from_one_byte_to_the_limit)
{
    const char *path = many_file(23);
    for (int pc = TA_PAGE_CACHE_KEEP; pc <= TA_PAGE_CACHE_BYPASS; pc += 2) {
        logged_cache_t *lc = load_cache(2, 1, (ta_page_cache_t)pc);
        loaded_and_checked(lc, path, "m", "2 readers");
        ta_cache_destroy(lc->c);
        free(lc);
    }
    int fd = open(path, O_RDONLY);
    cr_assert_geq(fd, 0);
    unsigned char byte;
    _ta_span_t span = {&byte, 0, 1};
    _ta_load_opts_t opts = {.threads = 1, .chunk = SIZE_MAX};
    _ta_load_report_t rep = {0};
    char why[200] = "";
    cr_assert_eq(_ta_load_spans(path, fd, &span, 1, &opts, &rep, why, sizeof why), EINVAL);
    cr_assert(strstr(why, "chunk"), "%s", why);
    close(fd);
}

/* Sizes that reach the end of size_t are refused by name, not wrapped. */
Test(cache, sizes_and_counts_past_what_fits_are_refused)
{
    ta_cache_t *c = new_cache(MiB, TA_OVERFLOW_ADMIT);
    cr_assert_eq(put(c, "keep", 512 * KiB, 1), 0);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_create_entry(c, "big", &e), 0);
    void *data = NULL;
    int64_t huge[1] = {INT64_MAX}; /* 2^64 - 2 bytes of U16: no product overflow */
    int rc = ta_entry_add_tensor(e, "w", TA_DTYPE_U16, 1, huge, &data);
    cr_assert_eq(rc, EINVAL, "a tensor of 2^64 - 2 bytes: rc %d (%s)", rc, cache_error());
    cr_assert(strstr(cache_error(), "bytes"), "%s", cache_error());
    int64_t two[2] = {INT64_MAX, INT64_MAX};
    cr_assert_eq(ta_entry_add_tensor(e, "w", TA_DTYPE_U8, 2, two, &data), EINVAL);
    cr_assert(strstr(cache_error(), "overflows"), "%s", cache_error());
    int64_t one[1] = {1};
    cr_assert_eq(ta_entry_add_tensor(e, "w", TA_DTYPE_U8, TA_MAX_DIMS + 1, one, &data), EINVAL);
    cr_assert(strstr(cache_error(), "dimensions"), "%s", cache_error());
    cr_assert_eq(ta_entry_add_tensor(e, "w", (ta_dtype_t)99, 1, one, &data), EINVAL);
    cr_assert(strstr(cache_error(), "dtype"), "%s", cache_error());
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.ram_used, 512 * KiB, "charged %" PRIu64, s.ram_used);
    cr_assert_eq(s.cleared, 0, "an impossible tensor evicted 'keep'");
    cr_assert_eq(s.over_budget_admits, 0);
    cr_assert_eq(ta_entry_add_tensor(e, "w", TA_DTYPE_U8, 1, one, &data), 0);
    ta_entry_unlock(e);
    /* an index past the tensors, and the stats struct's size, by name */
    cr_assert_eq(ta_cache_get(c, "big", &e), 0);
    ta_tensor_t t;
    cr_assert_eq(ta_entry_tensor_at(e, 1, &t), EINVAL);
    cr_assert(strstr(cache_error(), "index 1"), "%s", cache_error());
    cr_assert_eq(ta_entry_tensor(e, NULL, &t), EINVAL);
    cr_assert(strstr(cache_error(), "NULL"), "%s", cache_error());
    ta_entry_unlock(e);
    ta_cache_stats_t small = {.size = 8};
    cr_assert_eq(ta_cache_stats_get(c, &small), EINVAL);
    cr_assert(strstr(cache_error(), "size"), "%s", cache_error());
    ta_cache_destroy(c);
}

/* device_working_mem takes any value: the check that the device has the
 * bytes plus the working memory free must not wrap (before, need +
 * SIZE_MAX wrapped to need - 1 and the move went ahead). */
Test(cache, a_working_memory_larger_than_the_device_refuses_moves)
{
    use_fake_cudart();
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 16 * MiB,
                             .vram_budget = 16 * MiB,
                             .device_working_mem = SIZE_MAX,
                             .keep_ram_copy = true};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0, "%s", cache_error());
    cr_assert_eq(put(c, "a", MiB, 1), 0);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_get(c, "a", &e), 0);
    int rc = ta_entry_to_device(e);
    cr_assert_eq(rc, ENOMEM, "rc %d (%s)", rc, cache_error());
    cr_assert(strstr(cache_error(), "working"), "%s", cache_error());
    cr_assert_eq(cstats(c).vram_used, 0);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

/* ---- loads straight to the device ------------------------------------------- */

static ta_cache_t *device_cache(bool keep_ram_copy)
{
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 64 * MiB,
                             .vram_budget = 64 * MiB,
                             .keep_ram_copy = keep_ram_copy,
                             .load_threads = 2,
                             .load_chunk = 64 * KiB}; /* staging chunks of 256 KiB: many */
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    return c;
}

Test(cache, loads_straight_to_the_device_make_no_host_copy)
{
    use_fake_cudart();
    const char *path = many_file(101);
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    uint64_t data = (uint64_t)st.st_size - data_start_of(path);
    ta_cache_t *c = device_cache(false);
    ta_cuda_stats_t before = {.size = sizeof before};
    ta_cuda_stats_get(&before);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors_to_device(c, "m", path, &e), 0, "%s", cache_error());
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.vram_used, data);
    cr_assert_eq(s.ram_used, 0);
    cr_assert_eq(s.high_watermark, 0, "a host copy was charged");
    cr_assert_eq(s.loads, 1);
    cr_assert_eq(s.load_bytes, data);
    cr_assert_eq(s.device_moves, 1);
    ta_tensor_t t;
    for (size_t i = 0; ta_entry_tensor_at(e, i, &t) == 0; i++) {
        cr_assert_null(t.data);
        cr_assert_not_null(t.device_data);
    }
    ta_cuda_stats_t after = {.size = sizeof after};
    ta_cuda_stats_get(&after);
    cr_assert_eq(after.h2d_bytes - before.h2d_bytes, data);
    cr_assert_eq(after.direct_copies, before.direct_copies, "all through the staging buffers");
    /* back to the host: every byte is the file's */
    cr_assert_eq(ta_entry_to_host(e), 0, "%s", cache_error());
    expect_file_bytes(e);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

Test(cache, loads_to_the_device_keep_the_ram_copy_when_asked)
{
    use_fake_cudart();
    const char *path = many_file(101);
    ta_cache_t *c = device_cache(true);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors_to_device(c, "m", path, &e), 0, "%s", cache_error());
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.vram_used, s.ram_used);
    cr_assert_gt(s.ram_used, 0);
    expect_file_bytes(e);
    ta_tensor_t t;
    cr_assert_eq(ta_entry_tensor_at(e, 0, &t), 0);
    cr_assert_not_null(t.device_data);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

Test(cache, a_failed_load_to_the_device_gives_everything_back)
{
    use_fake_cudart();
    const char *path = many_file(101);
    ta_cache_t *c = device_cache(false);
    size_t free0, total;
    cr_assert_eq(ta_cuda_mem_info(&free0, &total), 0);
    hook_t h = {.at = 5, .err = EIO, .data_start = data_start_of(path)};
    _ta_os_set_read_hook(on_read, &h);
    ta_entry_t *e = NULL;
    int rc = ta_cache_load_safetensors_to_device(c, "m", path, &e);
    _ta_os_set_read_hook(NULL, NULL);
    cr_assert_eq(rc, EIO, "rc %d (%s)", rc, cache_error());
    cr_assert(strstr(cache_error(), "read failed at offset"), "%s", cache_error());
    cr_assert_null(e);
    ta_cache_stats_t s = cstats(c);
    cr_assert_eq(s.vram_used, 0);
    cr_assert_eq(s.ram_used, 0);
    cr_assert_eq(s.in_cache, 0);
    cr_assert_eq(s.loads, 0);
    size_t free1;
    cr_assert_eq(ta_cuda_mem_info(&free1, &total), 0);
    cr_assert_eq(free1, free0, "device memory leaked: %zu bytes", free0 - free1);
    /* and the same file loads once the fault is gone */
    cr_assert_eq(ta_cache_load_safetensors_to_device(c, "m", path, &e), 0, "%s", cache_error());
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

Test(cache, loads_to_the_device_fail_cleanly_without_a_gpu)
{
    setenv("TENSORALLOC_CUDART", "/nonexistent/libcudart.so", 1);
    const char *path = many_file(11);
    ta_cache_t *c = device_cache(false);
    ta_entry_t *e = NULL;
    int rc = ta_cache_load_safetensors_to_device(c, "m", path, &e);
    cr_assert(rc == TA_ENORUNTIME || rc == TA_ENOTSUP, "rc %d", rc);
    cr_assert_null(e);
    cr_assert_eq(cstats(c).in_cache, 0);
    ta_cache_destroy(c);
}

Test(cache, the_last_error_gives_its_code_and_message)
{
    ta_cache_t *c = new_cache(MiB, TA_OVERFLOW_REFUSE);
    ta_entry_t *e;
    int rc = ta_cache_load_safetensors(c, "x", "/nonexistent/file", &e);
    cr_assert_eq(rc, ENOENT);
    const char *message = NULL;
    cr_assert_eq(ta_cache_last_error(&message), ENOENT);
    cr_assert(strstr(message, "/nonexistent/file"), "%s", message);
    cr_assert_eq(ta_cache_last_error(NULL), ENOENT);
    ta_cache_destroy(c);
}

/* The header may list tensors in any order: the upload walks them in file
 * order (here the header's second tensor comes first in the file). */
Test(cache, loads_to_the_device_take_tensors_in_any_header_order)
{
    use_fake_cudart();
    char path[128];
    snprintf(path, sizeof path, "%s/rev.safetensors", dir);
    const char *hdr = "{\"late\":{\"dtype\":\"U8\",\"shape\":[300000],"
                      "\"data_offsets\":[200000,500000]},"
                      "\"early\":{\"dtype\":\"U8\",\"shape\":[200000],"
                      "\"data_offsets\":[0,200000]}}";
    write_st(path, hdr, 500000);
    ta_cache_t *c = device_cache(false);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors_to_device(c, "r", path, &e), 0, "%s", cache_error());
    cr_assert_eq(ta_entry_to_host(e), 0, "%s", cache_error());
    const char *names[] = {"late", "early"};
    const size_t offs[] = {200000, 0};
    for (int k = 0; k < 2; k++) {
        ta_tensor_t t;
        cr_assert_eq(ta_entry_tensor(e, names[k], &t), 0);
        const unsigned char *p = t.data;
        for (size_t x = 0; x < t.nbytes; x++)
            if (p[x] != (unsigned char)(3 + 7 * (offs[k] + x)))
                cr_assert_fail("%s byte %zu", names[k], x);
    }
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

/* ---- mapped entries (TA_PAGE_CACHE_MAP) and their file guard ----------------------- */

/* Whether addr lies in a mapping of the file at path (/proc/self/maps). */
static bool mapped_from(const void *addr, const char *path)
{
    FILE *f = fopen("/proc/self/maps", "r");
    cr_assert_not_null(f);
    char line[512];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && (uintptr_t)addr >= lo && (uintptr_t)addr < hi)
            found = strstr(line, path) != NULL;
    }
    fclose(f);
    return found;
}

/* Whether a lease is held on the file at path (/proc/locks: "LEASE ... dev:inode"). */
static bool lease_on(const char *path)
{
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    char inode[32];
    snprintf(inode, sizeof inode, ":%lu ", (unsigned long)st.st_ino);
    FILE *f = fopen("/proc/locks", "r");
    cr_assert_not_null(f);
    char line[256];
    bool found = false;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, "LEASE") && strstr(line, inode);
    fclose(f);
    return found;
}

static ta_entry_t *load_mapped(logged_cache_t *lc, const char *key, const char *path)
{
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors(lc->c, key, path, &e), 0, "%s", cache_error());
    expect_file_bytes(e);
    return e;
}

static void *tensor_data(ta_entry_t *e, const char *name)
{
    ta_tensor_t t;
    cr_assert_eq(ta_entry_tensor(e, name, &t), 0);
    return t.data;
}

Test(cache, mapped_entries_are_the_files_pages_until_written)
{
    const char *path = many_file(101);
    logged_cache_t *lc = load_cache(2, 256 * KiB, TA_PAGE_CACHE_MAP);
    ta_entry_t *e = load_mapped(lc, "m", path);
    cr_assert(strstr(lc->log, "mapped 'm'") && strstr(lc->log, "2 readers"), "%s", lc->log);
    ta_cache_stats_t s = cstats(lc->c);
    cr_assert_eq(s.mapped_loads, 1);
    cr_assert_eq(s.ram_used, ta_entry_ram_bytes(e), "charged as a copy would be");
    unsigned char *p = tensor_data(e, "t0");
    cr_assert(mapped_from(p, path), "no second copy: the tensors are the file's mapping");
    cr_assert(lease_on(path));
    /* a write is the entry's own: a second entry of the file sees the file's bytes */
    p[0] ^= 0xff;
    ta_entry_t *e2 = load_mapped(lc, "m2", path);
    cr_assert_neq(*(unsigned char *)tensor_data(e2, "t0"), p[0]);
    ta_entry_unlock(e);
    ta_entry_unlock(e2);
    cr_assert_eq(ta_cache_remove(lc->c, "m"), 0);
    cr_assert_eq(ta_cache_remove(lc->c, "m2"), 0);
    cr_assert_not(mapped_from(p, path), "an evicted entry's mapping is gone");
    cr_assert_not(lease_on(path), "and so is its lease");
    ta_cache_destroy(lc->c);
    free(lc);
}

/* Another process truncates the file (its pages in the mapping would then
 * raise SIGBUS) or writes over it in place (the entry's tensors would
 * change): the lease holds it back until the entry is a copy. */
Test(cache, a_mapped_entry_keeps_its_bytes_when_another_process_truncates_or_rewrites_the_file)
{
    for (int truncate = 1; truncate >= 0; truncate--) {
        const char *path = many_file(101);
        logged_cache_t *lc = load_cache(2, 256 * KiB, TA_PAGE_CACHE_MAP);
        ta_entry_t *e = load_mapped(lc, "m", path);
        void *p = tensor_data(e, "t0");
        cr_assert(mapped_from(p, path));
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) { /* held back in open until the parent gives its lease up */
            int fd = open(path, O_WRONLY | (truncate ? O_TRUNC : 0));
            static char junk[1 << 20];
            memset(junk, 0xee, sizeof junk);
            bool ok = fd >= 0;
            for (int i = 0; ok && i < 8; i++)
                ok = write(fd, junk, sizeof junk) == (ssize_t)sizeof junk;
            _exit(ok && (!truncate || ftruncate(fd, 100) == 0) ? 0 : 1);
        }
        int status;
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the writer failed");
        expect_file_bytes(e); /* without the guard: SIGBUS (truncated) or 0xee bytes */
        cr_assert_not(mapped_from(p, path), "the entry is a copy now, at the same addresses");
        cr_assert_eq(p, tensor_data(e, "t0"));
        cr_assert_eq(cstats(lc->c).mapped_copied, 1);
        cr_assert(log_shows(lc, "copied into memory"), "%s", lc->log);
        cr_assert_not(lease_on(path));
        ta_entry_unlock(e);
        ta_cache_destroy(lc->c);
        free(lc);
    }
}

Test(cache, a_file_open_for_writing_is_read_not_mapped)
{
    const char *path = many_file(31);
    int wfd = open(path, O_WRONLY);
    cr_assert_geq(wfd, 0);
    logged_cache_t *lc = load_cache(2, 0, TA_PAGE_CACHE_MAP);
    ta_entry_t *e = load_mapped(lc, "m", path);
    cr_assert(strstr(lc->log, "it is open for writing; read into memory instead"), "%s", lc->log);
    cr_assert(strstr(lc->log, "loaded 'm'"), "%s", lc->log);
    cr_assert_eq(cstats(lc->c).mapped_loads, 0);
    cr_assert_not(mapped_from(tensor_data(e, "t0"), path));
    ta_entry_unlock(e);
    ta_cache_destroy(lc->c);
    free(lc);
    close(wfd);
}

/* A forked child shares the parent's leased file descriptions: dropping
 * the entries it inherited must not give the parent's leases up. */
Test(cache, a_forked_child_leaves_its_parents_leases_alone)
{
    const char *path = many_file(31);
    logged_cache_t *lc = load_cache(2, 0, TA_PAGE_CACHE_MAP);
    ta_entry_unlock(load_mapped(lc, "m", path));
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        int rc = ta_cache_remove(lc->c, "m");
        ta_cache_destroy(lc->c);
        _exit(rc == 0 ? 0 : 1);
    }
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    cr_assert(lease_on(path), "the parent's lease is still held");
    ta_entry_t *e;
    cr_assert_eq(ta_cache_get(lc->c, "m", &e), 0);
    expect_file_bytes(e);
    ta_entry_unlock(e);
    ta_cache_destroy(lc->c);
    cr_assert_not(lease_on(path));
    free(lc);
}

Test(cache, a_mapped_entry_moved_to_the_device_gives_its_mapping_back)
{
    use_fake_cudart();
    const char *path = many_file(31);
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 64 * MiB,
                             .vram_budget = 64 * MiB,
                             .keep_ram_copy = false,
                             .page_cache = TA_PAGE_CACHE_MAP};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_load_safetensors(c, "m", path, &e), 0, "%s", cache_error());
    void *p = tensor_data(e, "t0");
    cr_assert(mapped_from(p, path));
    cr_assert_eq(ta_entry_to_device(e), 0, "%s", cache_error());
    cr_assert_null(tensor_data(e, "t0"));
    cr_assert_not(mapped_from(p, path));
    cr_assert_not(lease_on(path));
    cr_assert_eq(ta_entry_to_host(e), 0, "%s", cache_error());
    expect_file_bytes(e);
    ta_entry_unlock(e);
    ta_cache_destroy(c);
}

/* A file that cannot be mapped is read instead, with the reason logged. */
Test(cache, a_file_that_cannot_be_mapped_is_read_instead)
{
    const char *path = many_file(31);
    logged_cache_t *lc = load_cache(2, 0, TA_PAGE_CACHE_MAP);
    _ta_os_fail_every_map(1); /* the file's mapping; the tensors' blocks then come from the pool */
    ta_entry_t *e;
    int rc = ta_cache_load_safetensors(lc->c, "m", path, &e);
    _ta_os_fail_every_map(0);
    if (rc == ENOMEM) /* the fallback's blocks needed fresh mappings too: try them now */
        cr_assert_eq(ta_cache_load_safetensors(lc->c, "m", path, &e), 0, "%s", cache_error());
    else
        cr_assert_eq(rc, 0, "%s", cache_error());
    expect_file_bytes(e);
    cr_assert(strstr(lc->log, "cannot map"), "%s", lc->log);
    cr_assert(strstr(lc->log, "read into memory instead"), "%s", lc->log);
    ta_entry_unlock(e);
    ta_cache_destroy(lc->c);
    free(lc);
}

/* The guard's copy fails (no memory): the writer goes on, and the entry,
 * whose pages may now fault, is refused to gets (EIO) and can be removed. */
Test(cache, a_mapped_entry_whose_copy_fails_is_refused_not_served)
{
    const char *path = many_file(31);
    logged_cache_t *lc = load_cache(2, 0, TA_PAGE_CACHE_MAP);
    ta_entry_unlock(load_mapped(lc, "m", path));
    _ta_os_fail_every_map(1);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        _exit(truncate(path, 10) == 0 ? 0 : 1);
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    _ta_os_fail_every_map(0);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ta_entry_t *e;
    cr_assert_eq(ta_cache_get(lc->c, "m", &e), EIO);
    cr_assert(strstr(cache_error(), "could not be copied"), "%s", cache_error());
    cr_assert(log_shows(lc, "could not be copied"), "%s", lc->log);
    cr_assert_eq(cstats(lc->c).mapped_copied, 0);
    cr_assert_eq(ta_cache_remove(lc->c, "m"), 0);
    ta_cache_destroy(lc->c);
    free(lc);
}

/* ---- memory pressure ---------------------------------------------------- */

typedef struct {
    int calls;
    ta_cache_pressure_event_t last;
} pressure_seen_t;

static void heard_pressure_plain(const ta_pressure_event_t *ev, void *arg)
{
    (void)ev;
    (void)arg;
}

static void heard_pressure(const ta_cache_pressure_event_t *ev, void *arg)
{
    pressure_seen_t *s = arg;
    s->calls++;
    s->last = *ev;
}

Test(cache, pressure_evicts_unlocked_entries_lru_first_down_to_the_floor_then_the_budget_grows_back)
{
    pressure_seen_t seen = {0};
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 16 * MiB,
                             .pressure_floor = 5 * MiB,
                             .pressure_calm_ms = 300,
                             .on_pressure = heard_pressure,
                             .on_pressure_arg = &seen};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    const char *keys[] = {"a", "b", "c", "d", "e", "f", "g", "h"};
    for (int i = 0; i < 8; i++)
        cr_assert_eq(put(c, keys[i], 2 * MiB, i), 0);
    ta_entry_t *locked;
    cr_assert_eq(ta_cache_get(c, "a", &locked), 0); /* the least recent, but locked */
    ta_entry_t *b;
    cr_assert_eq(ta_cache_get(c, "b", &b), 0); /* b, got: now the most recent */
    ta_entry_unlock(b);
    ta_trim();
    cr_assert_eq(ta_pressure_signal(), 0);
    ta_cache_stats_t st = cstats(c);
    cr_assert_eq(seen.calls, 1);
    cr_assert_eq(st.pressure_events, 1);
    /* a quarter of 16 MiB, less the little the allocator gave back: 2 entries */
    cr_assert_geq(seen.last.evicted_entries, 1, "evicted %" PRIu64, seen.last.evicted_entries);
    cr_assert_eq(st.pressure_evicted_bytes, seen.last.evicted_bytes);
    cr_assert_lt(st.budget_now, 16 * MiB);
    cr_assert_leq(st.ram_used, st.budget_now);
    cr_assert(!present(c, "c"), "c, the least recent unlocked entry, is still there");
    cr_assert(present(c, "a") && present(c, "b"), "a locked or a recent entry went first");
    /* again and again: never below the floor, never the locked entry */
    for (int i = 0; i < 6; i++)
        ta_pressure_signal();
    st = cstats(c);
    cr_assert_geq(st.ram_used, 4 * MiB, "%" PRIu64 " bytes left, under the 5 MiB floor",
                  st.ram_used);
    cr_assert_eq(st.budget_now, 5 * MiB);
    cr_assert(present(c, "a"));
    /* under the lowered budget a load that does not fit is refused, and says why */
    cr_assert_eq(put(c, "big", 4 * MiB, 1), TA_ECACHEFULL);
    cr_assert(strstr(cache_error(), "lowered by memory pressure") != NULL, "%s", cache_error());
    /* calm: an eighth of the budget back each 300 ms */
    usleep(700 * 1000);
    uint64_t grown = cstats(c).budget_now;
    cr_assert(grown >= 5 * MiB + 4 * MiB && grown < 16 * MiB, "budget %" PRIu64, grown);
    usleep(2500 * 1000);
    cr_assert_eq(cstats(c).budget_now, 16 * MiB);
    ta_entry_unlock(locked);
    ta_cache_destroy(c); /* stops listening: a later signal does not reach it */
    ta_pressure_signal();
    cr_assert_eq(seen.calls, 7, "%d calls: heard after its cache was destroyed", seen.calls);
}

Test(cache, a_cache_that_ignores_pressure_keeps_its_entries)
{
    pressure_seen_t seen = {0};
    ta_cache_config_t cfg = {.size = sizeof cfg,
                             .ram_budget = 8 * MiB,
                             .pressure = TA_CACHE_PRESSURE_IGNORE,
                             .on_pressure = heard_pressure,
                             .on_pressure_arg = &seen};
    ta_cache_t *c;
    cr_assert_eq(ta_cache_create(&cfg, &c), 0);
    cr_assert_eq(put(c, "a", 4 * MiB, 1), 0);
    ta_pressure_signal();
    cr_assert(present(c, "a"));
    cr_assert_eq(seen.calls, 0);
    cr_assert_eq(cstats(c).budget_now, 8 * MiB);
    ta_cache_destroy(c);
}

/* A cache destroyed by another cache's on_pressure (a Python callback
 * that closes one, or the garbage collector running in it) is not called
 * again by that response or any later one. */
static ta_cache_t *victim_cache;

static void destroy_the_other(const ta_cache_pressure_event_t *ev, void *arg)
{
    (void)ev;
    pressure_seen_t *s = arg;
    s->calls++;
    ta_cache_destroy(victim_cache);
    victim_cache = NULL;
}

Test(cache, a_cache_destroyed_by_another_caches_callback_is_heard_no_more)
{
    pressure_seen_t seen_a = {0}, seen_b = {0};
    ta_cache_config_t cfg = {.size = sizeof cfg, .ram_budget = 8 * MiB,
                             .on_pressure = destroy_the_other, .on_pressure_arg = &seen_a};
    ta_cache_t *a, *b;
    cr_assert_eq(ta_cache_create(&cfg, &a), 0);
    cfg.on_pressure = heard_pressure;
    cfg.on_pressure_arg = &seen_b;
    cr_assert_eq(ta_cache_create(&cfg, &b), 0); /* listens after a: called after it */
    victim_cache = b;
    cr_assert_eq(ta_pressure_signal(), 0);
    cr_assert_eq(seen_a.calls, 1);
    cr_assert_eq(seen_b.calls, 0, "the destroyed cache was called in the same response");
    cr_assert_eq(ta_pressure_signal(), 0);
    cr_assert_eq(seen_b.calls, 0);
    /* its slot is free again: 16 listeners fit besides a */
    static int args[15];
    for (int i = 0; i < 15; i++)
        cr_assert_eq(ta_pressure_listen(heard_pressure_plain, &args[i]), 0, "listener %d", i);
    for (int i = 0; i < 15; i++)
        ta_pressure_unlisten(heard_pressure_plain, &args[i]);
    ta_cache_destroy(a);
}
