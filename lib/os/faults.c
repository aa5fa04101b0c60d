/* SPDX-License-Identifier: MIT */
/*
 * The tests' fault hooks (os.h, last section), compiled only into the test
 * build of the OS layer (TA_TEST_HOOKS). A countdown fires when it reaches
 * exactly 1; an "every" switch fires while on.
 */
#include "faults.h"
#include "os.h"

#include <stdatomic.h>

#ifndef TA_TEST_HOOKS
#error "faults.c belongs to the test build of the OS layer only"
#endif

static _Atomic long countdown[TA_FAULT_KINDS_];
static atomic_int every[TA_FAULT_KINDS_];
static _Atomic uint64_t injected;
static ta_os_read_hook_t _Atomic read_hook;
static void *_Atomic read_hook_arg;
static void (*_Atomic unmap_hook)(void *addr, size_t size);
static atomic_int old_mremap;
static void *_Atomic intruder;

static bool countdown_fires(_Atomic long *c)
{
    long left = atomic_load_explicit(c, memory_order_relaxed);
    while (left > 0)
        if (atomic_compare_exchange_weak(c, &left, left - 1))
            return left == 1;
    return false;
}

bool _ta_fault_fires(ta_fault_t kind)
{
    bool fires = countdown_fires(&countdown[kind]) ||
                 atomic_load_explicit(&every[kind], memory_order_relaxed);
    if (fires)
        atomic_fetch_add_explicit(&injected, 1, memory_order_relaxed);
    return fires;
}

int _ta_fault_read(int fd, size_t *len, uint64_t off)
{
    ta_os_read_hook_t hook = atomic_load_explicit(&read_hook, memory_order_acquire);
    int rc = hook ? hook(atomic_load(&read_hook_arg), fd, len, off) : 0;
    if (rc)
        atomic_fetch_add_explicit(&injected, 1, memory_order_relaxed);
    return rc;
}

void _ta_fault_before_unmap(void *addr, size_t size)
{
    void (*hook)(void *, size_t) = atomic_load_explicit(&unmap_hook, memory_order_relaxed);
    if (hook)
        hook(addr, size);
}

int _ta_fault_old_mremap(void)
{
    return atomic_load_explicit(&old_mremap, memory_order_relaxed);
}

void _ta_fault_set_intruder(void *page)
{
    atomic_store(&intruder, page);
}

uint64_t _ta_faults_injected(void)
{
    return atomic_load_explicit(&injected, memory_order_relaxed);
}

/* ---- os.h's test hooks ------------------------------------------------------ */

void _ta_os_fail_nth_map(long n)
{
    atomic_store(&countdown[TA_FAULT_MAP], n);
}

void _ta_os_fail_nth_remap(long n)
{
    atomic_store(&countdown[TA_FAULT_REMAP], n);
}

void _ta_os_fail_nth_unmap(long n)
{
    atomic_store(&countdown[TA_FAULT_UNMAP], n);
}

void _ta_os_fail_nth_advise(long n)
{
    atomic_store(&countdown[TA_FAULT_ADVISE], n);
}

void _ta_os_fail_nth_thread(long n)
{
    atomic_store(&countdown[TA_FAULT_THREAD], n);
}

void _ta_os_fail_every_unmap(int on)
{
    atomic_store(&every[TA_FAULT_UNMAP], on);
}

void _ta_os_fail_every_map(int on)
{
    atomic_store(&every[TA_FAULT_MAP], on);
}

void _ta_os_refuse_direct(int on)
{
    atomic_store(&every[TA_FAULT_DIRECT], on);
}

void _ta_os_set_read_hook(ta_os_read_hook_t hook, void *arg)
{
    atomic_store(&read_hook_arg, arg);
    atomic_store(&read_hook, hook);
}

void _ta_os_set_unmap_hook(void (*hook)(void *addr, size_t size))
{
    atomic_store(&unmap_hook, hook);
}

void _ta_os_emulate_old_mremap(int mode)
{
    atomic_store(&old_mremap, mode);
    atomic_store(&intruder, NULL);
}

void *_ta_os_emulated_intruder(void)
{
    return atomic_load(&intruder);
}
