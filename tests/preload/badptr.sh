#!/bin/sh
# SPDX-License-Identifier: MIT
# badptr.sh PRELOAD_LIB BADPTR_PROGRAM: each misuse must end the process
# with SIGABRT and one line naming the call and the address.
lib=$1 prog=$2
n=0 fail=0
echo "1..5"
for spec in "double-free-small:free(): double free: 0x" \
            "double-free-large:free(): invalid pointer: 0x" \
            "interior:free(): invalid pointer (not the start of a block): 0x" \
            "stack:free(): invalid pointer: 0x" \
            "realloc-freed:realloc(): invalid pointer: 0x"; do
    n=$((n + 1))
    case_=${spec%%:*} want="tensoralloc: ${spec#*:}"
    err=$(LD_PRELOAD="$lib" "$prog" "$case_" 2>&1 >/dev/null)
    rc=$?
    if [ $rc -eq 134 ] && printf '%s\n' "$err" | grep -qF "$want"; then
        echo "ok $n - $case_ aborts: $(printf '%s\n' "$err" | grep -F tensoralloc | head -1)"
    else
        echo "not ok $n - $case_: exit $rc, stderr: $err"
        fail=1
    fi
done
exit $fail
