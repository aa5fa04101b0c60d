#!/bin/sh
# SPDX-License-Identifier: MIT
# trace_test.sh TRACE_SCRIPT PROGRAM: the tracer records exactly the calls
# a known program makes, the replay makes the same calls, fork writes a
# trace per process, and damaged traces are refused with an offset.
trace=$1 prog=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
n=0 fail=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
bad() { n=$((n + 1)); echo "not ok $n - $1"; fail=1; }
echo "1..11"

if [ -x "$trace" ]; then ok "the build folder's tensoralloc-trace has its run bit"
else bad "the build folder's tensoralloc-trace has its run bit"; fi
"$trace" record -o "$work/t.tat" -- "$prog" >/dev/null || bad "record ran"
sh "$trace" info "$work/t.tat" --dump >"$work/dump" || bad "info --dump"
# the main thread is the one that made the marker; the workers are the rest
main=$(grep " malloc size=777 " "$work/dump" | head -1 | cut -d' ' -f1)
grep -v "^$main " "$work/dump" | sed 's/ id=.*//' >"$work/workers"
cat >"$work/expect" <<'EXPECT'
malloc size=100 align=0
calloc size=200 align=0
realloc size=5000 align=0
posix_memalign size=300000 align=64
free size=0 align=0
free size=0 align=0
free size=0 align=0
aligned_alloc size=8192 align=4096
free size=0 align=0
EXPECT
cut -d' ' -f2- "$work/workers" >"$work/got"
if cmp -s "$work/got" "$work/expect"; then ok "worker calls recorded exactly, in order"
else bad "worker calls differ:"; diff "$work/expect" "$work/got" | sed 's/^/# /'; fi

# ids: B frees the block A made with calloc; the realloc frees malloc's block
calloc_id=$(grep " calloc " "$work/dump" | grep -v "^$main " | sed 's/.* id=\([0-9]*\) .*/\1/')
malloc_id=$(grep " malloc size=100 " "$work/dump" | sed 's/.* id=\([0-9]*\) .*/\1/')
a_thread=$(grep " calloc size=200 " "$work/dump" | cut -d' ' -f1)
b_free=$(grep -v "^$main " "$work/dump" | grep -v "^$a_thread " | grep " free " | head -1 | sed 's/.* old=//')
realloc_old=$(grep " realloc size=5000 " "$work/dump" | sed 's/.* old=//')
if [ -n "$calloc_id" ] && [ "$b_free" = "$calloc_id" ] && [ "$realloc_old" = "$malloc_id" ]; then
    ok "cross-thread free and realloc name the right blocks (ids $calloc_id, $malloc_id)"
else bad "ids: calloc $calloc_id, B frees $b_free; malloc $malloc_id, realloc frees $realloc_old"; fi

threads=$(cut -d' ' -f1 "$work/dump" | sort -u | wc -l)
[ "$threads" -eq 3 ] && ok "three threads" || bad "$threads threads in the trace"

# replay it, traced: the same calls, thread by thread
sh "$trace" record -o "$work/r.tat" -- sh "$trace" replay "$work/t.tat" >"$work/replay.out" \
    && grep -q "^calls=" "$work/replay.out" && ok "replay ran" || bad "replay ran"
sh "$trace" info "$work/r.tat" --dump >"$work/rdump"
rmain=$(grep " malloc size=777 " "$work/rdump" | head -1 | cut -d' ' -f1)
per_thread() { # DUMP MAIN: each non-main thread's calls on one line, sorted
    grep -v "^$2 " "$1" | sed 's/ id=.*//' | awk '{t=$1; $1=""; s[t]=s[t] "|" $0} END {for (k in s) print s[k]}' | sort
}
per_thread "$work/dump" "$main" >"$work/orig.threads"
per_thread "$work/rdump" "$rmain" >"$work/replay.threads"
if cmp -s "$work/orig.threads" "$work/replay.threads"; then ok "the replay made the same calls per thread"
else bad "replayed calls differ"; diff "$work/orig.threads" "$work/replay.threads" | sed 's/^/# /'; fi

# fork: the parent's trace stays whole, the child writes FILE.PID
sh "$trace" record -o "$work/f.tat" -- "$prog" fork >/dev/null || bad "record with fork"
child=$(ls "$work"/f.tat.* 2>/dev/null | head -1)
if [ -n "$child" ] && sh "$trace" info "$child" --dump | grep -q " malloc size=4242 " \
    && ! sh "$trace" info "$child" --dump | grep -q " size=4343 "; then
    ok "the child's calls are in $(basename "$child")"
else bad "no child trace with malloc(4242)"; fi
if sh "$trace" info "$work/f.tat" --dump | grep -q " malloc size=4343 " \
    && ! sh "$trace" info "$work/f.tat" --dump | grep -q " size=4242 "; then
    ok "the parent's trace goes on after fork without the child's calls"
else bad "parent trace after fork"; fi

# damage: truncated, a flipped byte, a newer version
size=$(wc -c <"$work/t.tat")
head -c $((size - 5)) "$work/t.tat" >"$work/trunc.tat"
msg=$(sh "$trace" replay "$work/trunc.tat" 2>&1); rc=$?
case "$rc:$msg" in 3:*"corrupt at offset"*"nothing was replayed"*) ok "truncated trace refused: $msg" ;;
    *) bad "truncated trace: rc $rc: $msg" ;; esac
cp "$work/t.tat" "$work/flip.tat"
printf '\001' | dd of="$work/flip.tat" bs=1 seek=$((size - 3)) conv=notrunc 2>/dev/null
msg=$(sh "$trace" replay "$work/flip.tat" 2>&1); rc=$?
case "$rc:$msg" in 3:*"corrupt at offset"*) ok "corrupted trace refused: $msg" ;;
    *) bad "corrupted trace: rc $rc: $msg" ;; esac
cp "$work/t.tat" "$work/v2.tat"
printf '\002' | dd of="$work/v2.tat" bs=1 seek=8 conv=notrunc 2>/dev/null
msg=$(sh "$trace" info "$work/v2.tat" 2>&1); rc=$?
case "$rc:$msg" in 3:*"version 2"*) ok "a newer format version is refused: $msg" ;;
    *) bad "version: rc $rc: $msg" ;; esac
exit $fail
