#!/bin/sh
# SPDX-License-Identifier: MIT
# dlopen_library.sh LIB: libtensoralloc.so (global-dynamic TLS) can be
# loaded with dlopen into a running program and used from there.
py=/usr/bin/python3
[ -x $py ] || { echo "SKIP: $py absent"; exit 77; }
$py - "$1" <<'PY'
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.ta_malloc.restype = ctypes.c_void_p
lib.ta_usable_size.restype = ctypes.c_size_t
lib.ta_usable_size.argtypes = [ctypes.c_void_p]
lib.ta_free.argtypes = [ctypes.c_void_p]
blocks = [lib.ta_malloc(n) for n in (16, 5000, 1 << 20, 8 << 20)]
assert all(blocks), blocks
assert lib.ta_usable_size(blocks[3]) >= 8 << 20
for b in blocks:
    lib.ta_free(b)
print("dlopen of libtensoralloc.so: allocations in both paths work")
PY
