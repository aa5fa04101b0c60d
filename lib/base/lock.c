/* SPDX-License-Identifier: MIT */
/*
 * The lock's slow path: spin a little, then yield. No allocation, no
 * futex: a fork child resets a lock by storing 0.
 */
#include "base.h"


static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

void _ta_lock_slow(ta_lock_t *l)
{
    for (int spins = 0;; spins++) {
        int expected = 0;
        if (atomic_load_explicit(&l->held, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_weak_explicit(&l->held, &expected, 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return;
        if (spins < 64)
            cpu_relax();
        else
            _ta_os_yield();
    }
}
