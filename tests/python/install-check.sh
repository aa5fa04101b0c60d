#!/bin/sh
# SPDX-License-Identifier: MIT
# install-check.sh BUILD PYTHON SITE LIBDIR: `meson install` into a
# temporary DESTDIR, then the installed package (not the build folder's)
# imported by PYTHON from DESTDIR/SITE, loading a file and viewing it.
set -eu
build=$1 py=$2 site=$3 libdir=$4
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
meson install -C "$build" --destdir "$dest" --no-rebuild --quiet >/dev/null
test -f "$dest$site/tensoralloc/__init__.py" || { echo "FAIL: no $site/tensoralloc/__init__.py"; exit 1; }
# the installed extension finds the library through its run path; here the
# library sits under DESTDIR, so the loader is told where
PYTHONPATH="$dest$site" LD_LIBRARY_PATH="$dest$libdir" "$py" - "$dest" <<'PY'
import os, sys, tempfile
import tensoralloc as ta
dest = sys.argv[1]
assert ta.__file__.startswith(dest), f"imported {ta.__file__}, not the installed package"
import numpy as np
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "m.safetensors")
    w = np.arange(1000, dtype=np.float32).reshape(10, 100)
    ta.save_safetensors(p, {"w": w})
    cache = ta.ModelCache("16M")
    with cache.load("m", p) as e:
        assert np.array_equal(e.numpy("w"), w)
    print(f"PASS: the installed package ({os.path.dirname(ta.__file__)[len(dest):]}) "
          f"loads and views, version {ta.__version__}")
PY
# The installed PyTorch allocator: found beside the installed library.
if [ -f "$dest$libdir/libtensoralloc-torch.so.0" ] && "$py" -c "import torch" 2>/dev/null; then
    PYTHONPATH="$dest$site" LD_LIBRARY_PATH="$dest$libdir" "$py" - "$dest" <<'PY'
import sys
import torch
import tensoralloc as ta, tensoralloc.torch as tt
assert tt.library_path().startswith(sys.argv[1]), f"the shim at {tt.library_path()}"
before = ta.stats()["large_live_bytes"]
tt.install()
x = torch.ones(1 << 22)
assert ta.stats()["large_live_bytes"] >= before + (16 << 20)
tt.uninstall()
print(f"PASS: the installed shim ({tt.library_path()[len(sys.argv[1]):]}) installs")
PY
else
    echo "SKIP: the installed PyTorch allocator (no libtensoralloc-torch or no torch)"
fi
