/* SPDX-License-Identifier: MIT */
/*
 * The huge-page rule (thp.h): which fresh large mappings are advised
 * MADV_HUGEPAGE.
 *
 * A huge page makes all 2 MiB of it resident on the first touch. For a
 * tensor written whole that is one fault instead of 512 (half the time of
 * every model shape, issue 25); for a block touched here and there it is
 * up to 512 times the memory (large-scale touches the first and the last
 * page of 100,000 blocks: 6.3 GiB resident for 5,000 of them, against
 * 0.1 GiB without advice). No allocator can see the touches, but the
 * kernel can count them: THP=auto (the default) leaves some fresh mappings
 * unadvised as probes and reads their residency with mincore at later
 * requests. While the touched 2 MiB regions of the probes are at least
 * DENSE_NUM/DENSE_DEN resident (huge pages would then cost at most 1/7
 * more memory than 4 KiB pages), fresh mappings are advised and about one
 * in PROBE_EVERY is still a probe, so that a change is seen; otherwise
 * every fresh mapping is a probe. The idea of judging by residency is the
 * kernel's own: khugepaged collapses a region only if no more than
 * max_ptes_none of its pages are missing (Documentation/admin-guide/mm/
 * transhuge.rst).
 *
 * The probe state has a lock of its own, never held across a kernel call;
 * the figures are a statistic, so a probe lost to a race or to fork only
 * delays the next decision.
 */
#include "thp.h"

#define PROBE_SLOTS 4  /* probes waiting to be read */
#define PROBE_TRIES 4  /* reads of a probe still untouched before it is dropped */
#define PROBE_EVERY 16 /* fresh mappings per probe while blocks are dense */
#define PROBE_WINDOW 4 /* windows read of a probe larger than PROBE_WINDOW_BYTES */
#define PROBE_WINDOW_BYTES ((size_t)8 << 20)
#define DENSE_NUM 7 /* touched regions at least 7/8 resident: dense */
#define DENSE_DEN 8
#define DECAY_PAGES ((uint64_t)1 << 16) /* the estimate follows the last ~256 MiB probed */

typedef struct {
    uintptr_t addr;
    size_t size;
    unsigned tries;
} probe_t;

static ta_lock_t thp_lock;
static probe_t probes[PROBE_SLOTS]; /* oldest first */
static unsigned probe_count;
static uint64_t est_resident, est_spanned; /* pages, decayed */
static unsigned advised_run;               /* fresh mappings advised since the last probe */

static bool dense_locked(void)
{
    return est_spanned >= TA_HUGE_PAGE / _ta_os_page_size() &&
           est_resident * DENSE_DEN >= est_spanned * DENSE_NUM;
}

/* Takes probes[i] out of the queue (lock held). */
static probe_t probe_take_locked(unsigned i)
{
    probe_t p = probes[i];
    for (; i + 1 < probe_count; i++)
        probes[i] = probes[i + 1];
    probe_count--;
    return p;
}

/* Reads a probe: the whole of it, or PROBE_WINDOW windows spread over it;
 * false if it is gone (freed and unmapped meanwhile). */
static bool probe_read(const probe_t *p, ta_residency_t *sum)
{
    *sum = (ta_residency_t){0};
    size_t windows = p->size > PROBE_WINDOW * PROBE_WINDOW_BYTES ? PROBE_WINDOW : 1;
    size_t len = windows == 1 ? p->size : PROBE_WINDOW_BYTES;
    for (size_t w = 0; w < windows; w++) {
        size_t off = windows == 1 ? 0 : (p->size - len) / (windows - 1) * w;
        off &= ~(TA_HUGE_PAGE - 1);
        ta_residency_t r;
        if (_ta_os_residency((void *)(p->addr + off), len, TA_HUGE_PAGE, &r) != 0)
            return false;
        sum->resident += r.resident;
        sum->spanned += r.spanned;
        if (r.spanned) {
            sum->last_resident = r.last_resident;
            sum->last_spanned = r.last_spanned;
        }
    }
    return true;
}

/* Adds a read probe to the estimate; false if it is not to count yet. */
static bool probe_count_in(ta_residency_t r, bool last_try)
{
    bool settled = r.spanned > r.last_spanned;
    if (settled) {
        r.resident -= r.last_resident;
        r.spanned -= r.last_spanned;
    }
    if (!(settled || last_try) || r.spanned == 0)
        return false;
    _ta_lock(&thp_lock);
    est_resident += r.resident;
    est_spanned += r.spanned;
    while (est_spanned > DECAY_PAGES) {
        est_resident /= 2;
        est_spanned /= 2;
    }
    _ta_unlock(&thp_lock);
    return true;
}

/* Reads the oldest waiting probe into the estimate. Its last touched
 * region is left out while others were touched: a writer may be filling
 * it now (blocks read while a loader wrote them looked 85% resident, not
 * 100%). A probe with one touched region only is read again later, up to
 * PROBE_TRIES times, and then counted as it is. */
static void probe_one(void)
{
    _ta_lock(&thp_lock);
    if (probe_count == 0) {
        _ta_unlock(&thp_lock);
        return;
    }
    probe_t p = probe_take_locked(0);
    _ta_unlock(&thp_lock);

    ta_residency_t r;
    if (!probe_read(&p, &r))
        return;
    bool last_try = ++p.tries >= PROBE_TRIES;
    if (probe_count_in(r, last_try) || last_try)
        return;
    _ta_lock(&thp_lock);
    if (probe_count < PROBE_SLOTS)
        probes[probe_count++] = p;
    _ta_unlock(&thp_lock);
}

void _ta_thp_freeing(uintptr_t addr)
{
    _ta_lock(&thp_lock);
    unsigned i = 0;
    while (i < probe_count && probes[i].addr != addr)
        i++;
    if (i == probe_count) {
        _ta_unlock(&thp_lock);
        return;
    }
    probe_t p = probe_take_locked(i);
    _ta_unlock(&thp_lock);
    ta_residency_t r;
    if (probe_read(&p, &r))
        probe_count_in(r, true); /* its use is over: as it is */
}

bool _ta_thp_enabled(void)
{
    return _ta_opt(TA_OPT_THP) != 0 && _ta_os_thp_available();
}

bool _ta_thp_advise(void *addr, size_t cap, size_t fresh_bytes, bool filled)
{
    long long mode = _ta_opt(TA_OPT_THP);
    if (cap < TA_HUGE_PAGE || !_ta_thp_enabled())
        return false;
    /* a block its caller fills at once needs no probe: no page of it stays
     * untouched (the model cache's loads; the first load of a process
     * comes before any probe could be read) */
    if (mode == 1 || filled)
        return true;
    probe_one();
    _ta_lock(&thp_lock);
    bool dense = dense_locked();
    /* only a wholly fresh mapping tells what the program touches */
    bool probe = fresh_bytes == cap &&
                 (!dense || (++advised_run >= PROBE_EVERY && cap <= PROBE_WINDOW_BYTES) ||
                  advised_run >= 4 * PROBE_EVERY);
    if (probe) {
        advised_run = 0;
        if (probe_count == PROBE_SLOTS) /* the oldest goes unread */
            probe_take_locked(0);
        probes[probe_count++] = (probe_t){(uintptr_t)addr, cap, 0};
    }
    _ta_unlock(&thp_lock);
    return dense && !probe;
}

void _ta_thp_fork_child(void)
{
    /* a parent's thread may have held the lock at fork: the child's copy
     * of the state is a statistic, and the lock starts free */
    thp_lock = (ta_lock_t){0};
}
