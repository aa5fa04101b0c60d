/* SPDX-License-Identifier: MIT */
/*
 * The file guard: keeps the file under a mapped entry (TA_PAGE_CACHE_MAP)
 * from changing beneath it. Calls only the OS layer.
 */
#ifndef TA_FILE_GUARD_H
#define TA_FILE_GUARD_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct _ta_file_guard {
    int fd;    /* the file, read-only, leased; -1 once the mapping was copied */
    void *map; /* its private mapping, len bytes from the file's start */
    size_t len;
    int pid;          /* the process that leased it (set by start) */
    const char *what; /* for messages: the entry's key */
    /* Called by the guard thread after a break, with no lock held but g
     * kept (stop waits for it): rc 0 when the mapping is now anonymous
     * memory with the same contents, else the errno of the copy that
     * failed (g->broken is set). It must not stop g. */
    void (*copied)(void *arg, const struct _ta_file_guard *g, int rc);
    void *arg;
    atomic_bool broken; /* the file changed and the copy failed: reads may fault */
    bool lost;          /* a failed move lost map to someone else: never unmap it */
    bool busy;          /* the guard thread is copying it (under the guard's lock) */
    struct _ta_file_guard *prev, *next;
} _ta_file_guard_t;

/* Guards g (fd, map, len, what, copied and arg set): a read lease on fd,
 * broken by the kernel before anyone opens the file for writing or
 * truncates it. Returns 0, or an errno with the reason in why (the file
 * is open for writing, not this user's, on a filesystem without leases;
 * no guard thread): the caller must not use the mapping then. */
int _ta_file_guard_start(_ta_file_guard_t *g, char *why, size_t whylen);
/* Stops guarding g (waiting for a copy of it in progress): its lease
 * given up and fd closed; the mapping is left to the caller. */
void _ta_file_guard_stop(_ta_file_guard_t *g);

#endif
