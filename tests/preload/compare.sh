#!/bin/sh
# SPDX-License-Identifier: MIT
# compare.sh PRELOAD_LIB NAME COMMAND ARGS...
# Runs COMMAND under glibc's malloc and again with PRELOAD_LIB preloaded;
# passes when both exit 0 and print the same standard output. A command
# that is not installed is a skip (exit 77), reported with its name.
lib=$1 name=$2
shift 2
if ! command -v "$1" >/dev/null 2>&1; then
    echo "SKIP $name: $1 is not installed"
    exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && mkdir glibc preload)
(cd "$work/glibc" && "$@" >"$work/glibc.out" 2>"$work/glibc.err")
rc_glibc=$?
(cd "$work/preload" && LD_PRELOAD="$lib" "$@" >"$work/preload.out" 2>"$work/preload.err")
rc_preload=$?
status=0
if [ $rc_glibc -ne 0 ]; then
    echo "FAIL $name: exits $rc_glibc even under glibc"; cat "$work/glibc.err"; status=1
fi
if [ $rc_preload -ne 0 ]; then
    echo "FAIL $name: exits $rc_preload under tensoralloc"; tail -20 "$work/preload.err"; status=1
fi
if ! cmp -s "$work/glibc.out" "$work/preload.out"; then
    echo "FAIL $name: output differs from the glibc run"
    diff "$work/glibc.out" "$work/preload.out" | head -20
    status=1
fi
if grep -q "tensoralloc" "$work/preload.err"; then
    echo "FAIL $name: tensoralloc complained:"; grep tensoralloc "$work/preload.err"; status=1
fi
[ $status -eq 0 ] && echo "PASS $name: $(wc -c <"$work/preload.out") bytes of identical output, exit 0"
exit $status
