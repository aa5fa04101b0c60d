/* SPDX-License-Identifier: MIT */
/* Misuse under the preload library: badptr CASE performs one mistake. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    char local[32];
    char *volatile p;
    if (!strcmp(c, "double-free-small")) {
        p = malloc(40);
        free(p);
        free(p);
    } else if (!strcmp(c, "double-free-large")) {
        p = malloc(8 << 20);
        free(p);
        free(p);
    } else if (!strcmp(c, "interior")) {
        p = malloc(100);
        free(p + 8);
    } else if (!strcmp(c, "stack")) {
        p = local;
        free(p);
    } else if (!strcmp(c, "realloc-freed")) {
        p = malloc(3 << 20);
        free(p);
        p = realloc(p, 5 << 20);
    }
    puts("no abort");
    return 0;
}
