/* SPDX-License-Identifier: MIT */
/*
 * Conformance, running out of address space under RLIMIT_AS. What glibc
 * promises (malloc/tst-malloc-thread-fail.c, tst-malloc-too-large.c):
 * when the kernel refuses memory, malloc, calloc, realloc, memalign and
 * posix_memalign fail with ENOMEM (posix_memalign returns it), a failed
 * realloc leaves its block as it was, and once the program frees what it
 * holds it can allocate again: neither allocator keeps the address space
 * a program gave back. stdout's buffer is static, so printing needs no
 * allocation under the limit.
 */
#include "conform.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#define ROOM (512 * MiB)

static char out_buffer[1 << 16];

/* VmSize from /proc/self/statm, read without allocating. */
static size_t vm_size(void)
{
    char buf[128] = {0};
    int fd = open("/proc/self/statm", O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n > 0 ? (size_t)strtoull(buf, NULL, 10) * (size_t)sysconf(_SC_PAGESIZE) : 0;
}

/* Blocks are chained through their first word, so holding any number of
 * them needs no array. */
static void *hold(void *chain, void *p)
{
    *(void **)p = chain;
    return p;
}

static size_t release(void *chain)
{
    size_t n = 0;
    while (chain) {
        void *next = *(void **)chain;
        free(chain);
        chain = next;
        n++;
    }
    return n;
}

/* Allocates blocks of size until the limit refuses one; frees them all. */
static void fill_up(const char *what, size_t size, size_t expect_at_least)
{
    void *chain = NULL;
    size_t n = 0;
    int e = 0;
    for (;;) {
        errno = 0;
        void *p = malloc(size);
        e = errno;
        if (p == NULL)
            break;
        chain = hold(chain, p);
        n++;
    }
    printf("%s: the limit refused one with errno %s after at least %zu: %s\n", what, err_name(e),
           expect_at_least, yes(n >= expect_at_least));
    release(chain);
}

int main(void)
{
    setvbuf(stdout, out_buffer, _IOFBF, sizeof out_buffer);
    /* what the allocators set up on first use, before the limit */
    free(malloc(100));
    free(malloc(5 * MiB));

    struct rlimit limit = {vm_size() + ROOM, vm_size() + ROOM};
    if (limit.rlim_cur == ROOM || setrlimit(RLIMIT_AS, &limit) != 0) {
        printf("cannot set RLIMIT_AS\n");
        return 1;
    }
    printf("RLIMIT_AS: the address space in use plus %zu MiB\n", ROOM / MiB);

    TRY(16, 0, malloc(2 * ROOM), "malloc(2 x room)");
    TRY(16, 0, calloc(1, 2 * ROOM), "calloc(1, 2 x room)");
    TRY(16, 0, calloc(2 * ROOM / MiB, MiB), "calloc(2 x room / MiB, MiB)");
    TRY(4096, 0, memalign(4096, 2 * ROOM), "memalign(4096, 2 x room)");
    void *out = &out;
    errno = 0;
    int rc = posix_memalign(&out, 64, 2 * ROOM);
    int e = errno;
    printf("posix_memalign(64, 2 x room) returns %s, errno %s, out %s\n", err_name(rc), err_name(e),
           out == &out ? "untouched" : "WRITTEN");

    unsigned char *keep = malloc(MiB);
    fill(keep, MiB, 7);
    errno = 0;
    void *grown = realloc(keep, 2 * ROOM);
    e = errno;
    printf("realloc(1 MiB -> 2 x room) = %s, errno %s, old block intact %s\n",
           grown ? "block" : "NULL", err_name(e), yes(intact(keep, MiB, 7)));
    free(grown ? grown : keep);

    /* up to the limit and back, in each size range, three times: what was
     * freed must be there for the next round */
    for (int round = 0; round < 3; round++) {
        fill_up("1 MiB blocks", MiB, ROOM / MiB / 2);
        fill_up("64 KiB blocks", 64 * KiB, ROOM / (64 * KiB) / 2);
        fill_up("1000-byte blocks", 1000, ROOM / 1000 / 4);
    }
    TRY(16, ROOM / 2, malloc(ROOM / 2), "after freeing everything: malloc(room / 2)");
    TRY(16, ROOM / 2, calloc(1, ROOM / 2), "after freeing everything: calloc(1, room / 2)");
    return 0;
}
