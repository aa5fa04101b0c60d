/* SPDX-License-Identifier: MIT */
/*
 * Fault injection, private to the OS layer. The test build of the layer
 * (TA_TEST_HOOKS: meson's ta_os_test, which the test suites link) has the
 * hooks of os.h's last section, in faults.c; the shipped libraries compile
 * every check below to a constant, so their paths carry no hook.
 */
#ifndef TA_OS_FAULTS_H
#define TA_OS_FAULTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The kinds of call a test can make fail. */
typedef enum {
    TA_FAULT_MAP,
    TA_FAULT_UNMAP,
    TA_FAULT_REMAP,
    TA_FAULT_ADVISE,
    TA_FAULT_THREAD,
    TA_FAULT_DIRECT, /* an O_DIRECT open */
    TA_FAULT_KINDS_
} ta_fault_t;

#ifdef TA_TEST_HOOKS
/* Whether this call of the kind fails (a test's "the Nth" or "every"). */
bool _ta_fault_fires(ta_fault_t kind);
/* The read hook's verdict: 0 reads (*len perhaps shortened), else the error. */
int _ta_fault_read(int fd, size_t *len, uint64_t off);
void _ta_fault_before_unmap(void *addr, size_t size);
/* The emulated old mremap's mode (0: the kernel's own behaviour). */
int _ta_fault_old_mremap(void);
void _ta_fault_set_intruder(void *page);
uint64_t _ta_faults_injected(void);
#else
static inline bool _ta_fault_fires(ta_fault_t kind)
{
    (void)kind;
    return false;
}
static inline int _ta_fault_read(int fd, size_t *len, uint64_t off)
{
    (void)fd, (void)len, (void)off;
    return 0;
}
static inline void _ta_fault_before_unmap(void *addr, size_t size)
{
    (void)addr, (void)size;
}
static inline int _ta_fault_old_mremap(void)
{
    return 0;
}
static inline void _ta_fault_set_intruder(void *page)
{
    (void)page;
}
static inline uint64_t _ta_faults_injected(void)
{
    return 0;
}
#endif

#endif
