#!/bin/sh
# SPDX-License-Identifier: MIT
# check-layers.sh LIBA: the large path (lib/large.c) calls down only: the OS
# layer, its pool's data structure, the options, the log and the lock; never
# the slabs, the purge thread or the front door, which it tells what to do
# through return codes (docs/design.md, "Layers"). The pool (lib/pool.c)
# calls nothing of tensoralloc and nothing of the kernel. The loader
# (lib/loader.c, when the cache is built) calls only the OS layer.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
(cd "$dir" && ar x "$1")
obj=$(ls "$dir"/*large.c.o)
up=$(nm -u "$obj" | awk '{print $2}' | grep '^_ta_' |
     grep -Ev '^_ta_(os_|pool_|opt|options|log|lock_slow$|live_mappings$)' || true)
if [ -n "$up" ]; then
    echo "FAIL: lib/large.c calls up into: $up"
    exit 1
fi
pool=$(ls "$dir"/*pool.c.o)
calls=$(nm -u "$pool" | awk '{print $2}' | grep -Ev '^(memset|memcpy)$' || true)
if [ -n "$calls" ]; then
    echo "FAIL: lib/pool.c calls out: $calls"
    exit 1
fi
loader=$(ls "$dir"/*loader.c.o 2>/dev/null || true)
if [ -n "$loader" ]; then
    up=$(nm -u "$loader" | awk '{print $2}' | grep -E '^_?ta_' | grep -Ev '^_ta_os_' || true)
    if [ -n "$up" ]; then
        echo "FAIL: lib/loader.c calls more than the OS layer: $up"
        exit 1
    fi
fi
echo "PASS: lib/large.c calls only the OS layer, the pool, options, log and lock; lib/pool.c nothing; lib/loader.c only the OS layer"
