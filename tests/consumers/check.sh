#!/bin/sh
# SPDX-License-Identifier: MIT
# check.sh BUILD SRC LIBDIR PREFIX ROOT PYTHON: `meson install` into a
# temporary DESTDIR, then a CMake project (find_package(tensoralloc),
# shared and static targets, the preload target's path) and a static link
# through pkg-config (Libs.private and Requires.private complete), each
# built and run; then, where the PyTorch shim was built, the C++ server
# (ROOT/tools/torch_serve.cpp) with CMake (tensoralloc::torch and
# find_package(Torch)), run on a TorchScript model PYTHON makes, and the
# entry-tensors test (ROOT/tests/torch) through pkg-config tensoralloc-torch.
build=$1 src=$2 libdir=$3 prefix=$4 root_src=$5 py=$6
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
n=0 fail=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
bad() { n=$((n + 1)); echo "not ok $n - $1"; fail=1; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
echo "1..8"
meson install -C "$build" --destdir "$dest" --no-rebuild --quiet >/dev/null || { echo "Bail out! meson install failed"; exit 1; }
root=$dest$prefix

if command -v cmake >/dev/null; then
    if cmake -S "$src" -B "$dest/cmake-build" -DCMAKE_PREFIX_PATH="$root" >"$dest/cmake.log" 2>&1 &&
       cmake --build "$dest/cmake-build" >>"$dest/cmake.log" 2>&1; then
        ok "find_package(tensoralloc 0.1) configures and builds"
        if LD_LIBRARY_PATH="$dest$libdir" "$dest/cmake-build/consumer" | grep -q "consumer ok" &&
           "$dest/cmake-build/consumer_static" | grep -q "consumer ok" &&
           ! ldd "$dest/cmake-build/consumer_static" | grep -q libtensoralloc &&
           [ -f "$(cat "$dest/cmake-build/preload-path.txt")" ]; then
            ok "tensoralloc::tensoralloc, ::tensoralloc_static and ::preload work"
        else
            bad "tensoralloc::tensoralloc, ::tensoralloc_static and ::preload work"
        fi
    else
        sed 's/^/# /' "$dest/cmake.log" | tail -30
        bad "find_package(tensoralloc 0.1) configures and builds"
        bad "the CMake targets work"
    fi
else
    skip "find_package(tensoralloc)" "cmake is not installed (apt-get install cmake)"
    skip "the CMake targets" "cmake is not installed"
fi

pc=$(PKG_CONFIG_PATH="$dest$libdir/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$dest" \
     pkg-config --static --cflags --libs tensoralloc) || pc=
if [ -n "$pc" ]; then
    ok "pkg-config --static knows tensoralloc"
    # the archive instead of -ltensoralloc: what is left must resolve it all
    flags=$(echo "$pc" | sed 's/-ltensoralloc\b//')
    if cc "$src/main.c" -o "$dest/pc-static" "$dest$libdir/libtensoralloc.a" $flags 2>"$dest/cc.log" &&
       "$dest/pc-static" | grep -q "consumer ok"; then
        ok "a static link with pkg-config's private flags builds and runs ($flags)"
    else
        sed 's/^/# /' "$dest/cc.log" | tail -20
        bad "a static link with pkg-config's private flags builds and runs ($flags)"
    fi
    # The exit report (TENSORALLOC_STATS=1) of a static program that never
    # calls ta_stats_*: the archive's front door must bring the report in.
    printf '#include <tensoralloc.h>\nint main(void) { ta_free(ta_malloc(100)); return 0; }\n' \
        >"$dest/nostats.c"
    if cc "$dest/nostats.c" -I"$root/include" -o "$dest/nostats" "$dest$libdir/libtensoralloc.a" \
            $flags 2>"$dest/cc.log" &&
       TENSORALLOC_STATS=1 "$dest/nostats" 2>&1 >/dev/null | grep -q "large_live_count"; then
        ok "a static program that never asks for statistics still prints the exit report"
    else
        sed 's/^/# /' "$dest/cc.log" | tail -20
        bad "a static program that never asks for statistics still prints the exit report"
    fi
else
    bad "pkg-config --static knows tensoralloc"
    bad "a static link through pkg-config"
    bad "the exit report of a static link"
fi

# The C++ side of PyTorch: only where the shim was built and installed.
if [ ! -e "$dest$libdir/libtensoralloc-torch.so" ]; then
    for what in "the C++ server builds with CMake" "it serves a TorchScript model" \
                "pkg-config tensoralloc-torch"; do
        skip "$what" "this build has no libtensoralloc-torch (libtorch-dev)"
    done
    exit $fail
fi
if command -v cmake >/dev/null &&
   cmake -S "$src/torch" -B "$dest/torch-build" -DCMAKE_PREFIX_PATH="$root" \
         -DSERVE_SOURCE="$root_src/tools/torch_serve.cpp" >"$dest/cmake-torch.log" 2>&1 &&
   cmake --build "$dest/torch-build" >>"$dest/cmake-torch.log" 2>&1; then
    ok "the C++ server builds from the install with CMake (tensoralloc::torch, find_package(Torch))"
    if "$py" -c 'import torch' 2>/dev/null; then
        "$py" -c 'import sys, torch
m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 256)).eval()
torch.jit.trace(m, torch.ones(1, 3, 64, 64)).save(sys.argv[1])' "$dest/linear.pt"
        out=$(LD_LIBRARY_PATH="$dest$libdir" "$dest/torch-build/torch_serve" --requests 3 \
              "$dest/linear.pt" 2>&1)
        # the 12 MiB weight comes from tensoralloc's large path
        if echo "$out" | grep -q "summary allocator tensoralloc .* mismatches 0 .*ta_large_allocs [1-9]"; then
            ok "it serves a TorchScript model with tensoralloc as PyTorch's allocator"
        else
            echo "$out" | sed 's/^/# /' | tail -10
            bad "it serves a TorchScript model with tensoralloc as PyTorch's allocator"
        fi
    else
        skip "it serves a TorchScript model" "$py cannot import torch to make one (python3-torch)"
    fi
else
    sed 's/^/# /' "$dest/cmake-torch.log" | tail -30
    bad "the C++ server builds from the install with CMake (tensoralloc::torch, find_package(Torch))"
    bad "it serves a TorchScript model"
fi
torch_pc=$(PKG_CONFIG_PATH="$dest$libdir/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$dest" \
           pkg-config --cflags --libs tensoralloc-torch) || torch_pc=
if [ -n "$torch_pc" ] &&
   c++ -std=c++17 "$root_src/tests/torch/test_entry_tensors.cpp" -o "$dest/entry-tensors" \
       $torch_pc -ltorch_cpu -lc10 2>"$dest/cxx.log" &&
   LD_LIBRARY_PATH="$dest$libdir" "$dest/entry-tensors" >"$dest/entry.log" 2>&1; then
    ok "pkg-config tensoralloc-torch: a program on entry_tensors builds and passes ($torch_pc)"
else
    sed 's/^/# /' "$dest/cxx.log" "$dest/entry.log" 2>/dev/null | tail -20
    bad "pkg-config tensoralloc-torch: a program on entry_tensors builds and passes"
fi
exit $fail
