/* SPDX-License-Identifier: MIT */
/*
 * The file guard: keeps the file under a mapped entry (TA_PAGE_CACHE_MAP)
 * from changing beneath it. Calls only the OS layer.
 */
#ifndef TA_FILE_GUARD_H
#define TA_FILE_GUARD_H

#include <stddef.h>

typedef struct _ta_file_guard {
    int fd;    /* the file, read-only, leased; -1 once the mapping was copied */
    void *map; /* its private mapping, len bytes from the file's start */
    size_t len;
    int pid;          /* the process that leased it (set by start) */
    const char *what; /* for messages: the entry's key */
    /* Called by the guard thread, with the guard's lock held (it must not
     * call back into the guard), after a break: rc 0 when the mapping is
     * now anonymous memory with the same contents, else the errno of the
     * copy that failed. */
    void (*copied)(void *arg, const struct _ta_file_guard *g, int rc);
    void *arg;
    struct _ta_file_guard *prev, *next;
} _ta_file_guard_t;

/* Guards g (fd, map, len, what, copied and arg set): a read lease on fd,
 * broken by the kernel before anyone opens the file for writing or
 * truncates it. Returns 0, or an errno with the reason in why (the file
 * is open for writing, not this user's, on a filesystem without leases;
 * no guard thread): the caller must not map the file then. */
int _ta_file_guard_start(_ta_file_guard_t *g, char *why, size_t whylen);
/* Stops guarding g: its lease given up and fd closed; the mapping is left
 * to the caller. */
void _ta_file_guard_stop(_ta_file_guard_t *g);

#endif
