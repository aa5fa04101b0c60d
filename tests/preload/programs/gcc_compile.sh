#!/bin/sh
# SPDX-License-Identifier: MIT
# gcc compiling and linking a C file, then the program's output.
cat >prog.c <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
struct node { struct node *next; int v; };
int main(void) {
    struct node *head = NULL;
    for (int i = 0; i < 100000; i++) {
        struct node *n = malloc(sizeof *n);
        n->v = i; n->next = head; head = n;
    }
    long s = 0;
    while (head) { struct node *n = head; s += n->v; head = n->next; free(n); }
    printf("sum %ld\n", s);
    return 0;
}
C
gcc -O2 -Wall -o prog prog.c && ./prog && gcc -O0 -g -c prog.c -o prog.o && echo compiled
