/* SPDX-License-Identifier: MIT */
/*
 * Intrusive doubly linked lists through an element's `prev` and `next`
 * members (any struct type that has both): the list is a head pointer, and
 * a tail pointer too for the _TAIL forms. Written once for the slab path's
 * segment and partial-span lists and the cache's LRU list. Statements;
 * each argument is evaluated more than once.
 */
#ifndef TA_LIST_H
#define TA_LIST_H

#include <stddef.h>

/* e goes first. */
#define TA_LIST_PUSH(head, e)                                                                      \
    do {                                                                                           \
        (e)->prev = NULL;                                                                          \
        (e)->next = (head);                                                                        \
        if ((e)->next)                                                                             \
            (e)->next->prev = (e);                                                                 \
        (head) = (e);                                                                              \
    } while (0)

/* e goes right after after (first when after is NULL). */
#define TA_LIST_INSERT_AFTER(head, after, e)                                                       \
    do {                                                                                           \
        (e)->prev = (after);                                                                       \
        (e)->next = (after) ? (after)->next : (head);                                              \
        if ((e)->next)                                                                             \
            (e)->next->prev = (e);                                                                 \
        if (after)                                                                                 \
            (after)->next = (e);                                                                   \
        else                                                                                       \
            (head) = (e);                                                                          \
    } while (0)

#define TA_LIST_UNLINK(head, e)                                                                    \
    do {                                                                                           \
        if ((e)->prev)                                                                             \
            (e)->prev->next = (e)->next;                                                           \
        else                                                                                       \
            (head) = (e)->next;                                                                    \
        if ((e)->next)                                                                             \
            (e)->next->prev = (e)->prev;                                                           \
        (e)->next = (e)->prev = NULL;                                                              \
    } while (0)

/* e goes last. */
#define TA_LIST_PUSH_TAIL(head, tail, e)                                                           \
    do {                                                                                           \
        (e)->prev = (tail);                                                                        \
        (e)->next = NULL;                                                                          \
        if (tail)                                                                                  \
            (tail)->next = (e);                                                                    \
        else                                                                                       \
            (head) = (e);                                                                          \
        (tail) = (e);                                                                              \
    } while (0)

#define TA_LIST_UNLINK_TAIL(head, tail, e)                                                         \
    do {                                                                                           \
        if (!(e)->next)                                                                            \
            (tail) = (e)->prev;                                                                    \
        TA_LIST_UNLINK(head, e);                                                                   \
    } while (0)

#endif
