/* SPDX-License-Identifier: MIT */
/* A library that allocates at load time and on call, for the dlopen test. */
#include <stdlib.h>
#include <string.h>

static char *at_load;

__attribute__((constructor)) static void load(void)
{
    at_load = strdup("allocated in a constructor of a dlopened library");
}

char *dlalloc_make(size_t n);
char *dlalloc_make(size_t n)
{
    char *p = malloc(n);
    memset(p, 'a', n);
    p[n - 1] = 0;
    return p;
}

const char *dlalloc_hello(void);
const char *dlalloc_hello(void)
{
    return at_load;
}
