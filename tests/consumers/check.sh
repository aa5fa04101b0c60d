#!/bin/sh
# SPDX-License-Identifier: MIT
# check.sh BUILD SRC LIBDIR PREFIX: `meson install` into a temporary DESTDIR,
# then a CMake project (find_package(tensoralloc), shared and static
# targets, the preload target's path) and a static link through pkg-config
# (Libs.private and Requires.private complete), each built and run.
build=$1 src=$2 libdir=$3 prefix=$4
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
n=0 fail=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
bad() { n=$((n + 1)); echo "not ok $n - $1"; fail=1; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
echo "1..5"
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
exit $fail
