#!/bin/sh
# SPDX-License-Identifier: MIT
# launcher.sh RUN_SCRIPT PRELOAD_LIB PACKAGE_DIR: tensoralloc-run's options,
# errors and --stats, and the tensoralloc Python package (PACKAGE_DIR: the
# build's tools/python; empty when it is not built) reading the preloaded
# allocator's figures through it.
run=$1 lib=$2 helper=$3
fail=0
check() { if eval "$2"; then echo "ok - $1"; else echo "not ok - $1"; fail=1; fi; }
echo "1..9"
check "the build folder's script has its run bit and runs as a program" "[ -x '$run' ] && '$run' --help >/dev/null"
out=$(env -u TENSORALLOC_PRELOAD_LIB "$run" --stats -- perl -e 'print "child\n"' 2>&1)
check "without --library it finds the preload library beside it" "echo \"\$out\" | grep -q 'tensoralloc .* statistics'"
check "--help exits 0 and shows usage" "sh '$run' --help | grep -q '^usage: tensoralloc-run'"
sh "$run" --bogus true >/dev/null 2>&1; rc=$?
check "an unknown option exits 2" "[ $rc -eq 2 ]"
sh "$run" --library /nonexistent/lib.so true >/dev/null 2>&1; rc=$?
check "a missing library exits 127" "[ $rc -eq 127 ]"
out=$(sh "$run" --library "$lib" --stats -- perl -e 'print "child\n"' 2>&1)
check "--stats prints statistics at exit" "echo \"\$out\" | grep -q 'tensoralloc .* statistics'"
check "the command's own output is kept" "echo \"\$out\" | grep -q '^child$'"
py=/usr/bin/python3
if [ -x $py ] && [ -n "$helper" ]; then
    out=$(PYTHONPATH="$helper" sh "$run" --library "$lib" --threshold 64K --retain 0 -- $py -c '
import ctypes, tensoralloc
st = tensoralloc.stats()
print("threshold", st["opt_threshold"], "retain", st["opt_retain_bytes"])
before = tensoralloc.MemorySnapshot.capture()
blob = bytearray(100 * 2**20)
after = tensoralloc.MemorySnapshot.capture()
print(tensoralloc.get_pretty_snapshot_diff(before, after))
assert after.large_mapped - before.large_mapped >= 100 * 2**20
ours = tensoralloc.mallinfo2()
glibc = ctypes.CDLL("libc.so.6").mallinfo2
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
glibc.restype = MI
g = glibc()
assert g.hblkhd < ours["hblkhd"], (g.hblkhd, ours["hblkhd"])
print("glibc hblkhd", g.hblkhd, "ours", ours["hblkhd"] >= 100 * 2**20)
del blob
tensoralloc.trim()
print("version", tensoralloc.__version__)
' 2>&1)
    check "options reach the process; the package's snapshot/diff/mallinfo2 read the preloaded allocator" \
        "echo \"\$out\" | grep -q 'threshold 65536 retain 0' && echo \"\$out\" | grep -q '^tensoralloc mapped (large) *(+0.10' && echo \"\$out\" | grep -q 'ours True'"
    [ $fail -eq 0 ] || echo "$out" | sed 's/^/# /'
    # without the preload library the package reads its own library's
    # figures: a Python bytearray is glibc's memory then, not tensoralloc's
    out=$(PYTHONPATH="$helper" $py -c '
import tensoralloc
b = bytearray(100 * 2**20)
print(tensoralloc.mallinfo2()["hblkhd"] < 2**20)')
    check "without the preload library the package's figures are its own library's" "[ '$out' = True ]"
else
    echo "ok - python package # SKIP /usr/bin/python3 or the package (python3-dev) absent"
    echo "ok - python package without preload # SKIP /usr/bin/python3 or the package absent"
fi
exit $fail
