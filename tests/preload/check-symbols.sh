#!/bin/sh
# SPDX-License-Identifier: MIT
# check-symbols.sh LIB EXPECTED [EXCLUDE] [libc]: the dynamic symbols LIB
# defines must be exactly the list in EXPECTED (one name per line), less the
# names matching the regular expression EXCLUDE (features left out of the
# build). With "libc", also: for every name N in EXPECTED, if the libc.so.6
# LIB is linked against exports __libc_N (glibc's internal alias of its
# allocator entry point), LIB must export __libc_N too; else a caller of the
# alias reaches glibc's own allocator behind the replacement's back.
tmp=${TMPDIR:-/tmp}/ta-syms.$$
trap 'rm -f "$tmp" "$tmp.libc"' EXIT
nm -D --defined-only "$1" | awk '{print $3}' | sed 's/@.*//' | sort -u >"$tmp"
sort -u "$2" | grep -Ev "${3:-^$}" | diff -u - "$tmp"
rc=$?
[ $rc -eq 0 ] && echo "PASS: $(wc -l <"$2") exported symbols, exactly the intended list"
if [ "$4" = libc ]; then
    libc=$(ldd "$1" | awk '$1 == "libc.so.6" {print $3}')
    if [ ! -r "$libc" ]; then
        echo "FAIL: cannot find the libc.so.6 $1 links against"
        exit 1
    fi
    nm -D --defined-only "$libc" | awk '{print $3}' | sed 's/@.*//' | grep '^__libc_' |
        sort -u >"$tmp.libc"
    missing=0 checked=0
    for name in $(sort -u "$2"); do
        grep -qx "__libc_$name" "$tmp.libc" || continue
        checked=$((checked + 1))
        if ! grep -qx "__libc_$name" "$tmp"; then
            echo "FAIL: $libc exports __libc_$name; $1 does not"
            missing=$((missing + 1))
        fi
    done
    if [ $missing -eq 0 ]; then
        echo "PASS: all $checked __libc_* aliases $libc exports for the replaced names"
    else
        rc=1
    fi
fi
exit $rc
