#!/bin/sh
# SPDX-License-Identifier: MIT
# wheel-check.sh SOURCE PYTHON TORCH_SHIM: the package as pip users get it
# (pyproject.toml, meson-python). Builds the wheel with `python -m build
# --wheel --no-isolation`, checks what it holds and its run paths, installs
# it into a fresh virtual environment in a temporary folder and there
# imports the package, loads a real file through the cache, starts a
# program with `python -m tensoralloc run` and the tensoralloc-run script,
# and uses tensoralloc.torch.install() where torch is present; then the
# wheel unpacked somewhere else, and `pip install .` into a second venv.
# TORCH_SHIM is 1 when this build has the PyTorch shim (so must the wheel).
set -eu
src=$1 py=$2 torch_shim=$3
for mod in mesonpy build venv pip; do
    if ! "$py" -c "import $mod" 2>/dev/null; then
        echo "SKIP: $py cannot import $mod (apt-get install python3-mesonpy python3-build python3-venv python3-pip)"
        exit 77
    fi
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# 1. The wheel.
(cd "$src" && "$py" -m build --wheel --no-isolation --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1) ||
    { tail -30 "$tmp/build.log"; fail "python -m build --wheel --no-isolation failed"; }
set -- "$tmp"/dist/tensoralloc-*.whl
[ $# -eq 1 ] && [ -f "$1" ] || fail "no single wheel in $tmp/dist: $*"
wheel=$1
echo "built $(basename "$wheel")"
"$py" - "$wheel" "$torch_shim" "$tmp/unpacked" <<'PY' || exit 1
import subprocess, sys, zipfile
wheel, torch_shim, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
names = set(zipfile.ZipFile(wheel).namelist())
package = {n for n in names if not n.startswith("tensoralloc-")}  # less the .dist-info
want = {"tensoralloc/__init__.py", "tensoralloc/__main__.py", "tensoralloc/torch.py",
        "tensoralloc/libtensoralloc.so", "tensoralloc/libtensoralloc-preload.so"}
if torch_shim:
    want.add("tensoralloc/libtensoralloc-torch.so")
ext = [n for n in package if n.startswith("tensoralloc/_tensoralloc.") and n.endswith(".so")]
if len(ext) != 1:
    sys.exit(f"FAIL: the wheel holds {len(ext)} extension modules: {sorted(package)}")
if package != want | set(ext):
    sys.exit(f"FAIL: the wheel holds {sorted(package)}; expected {sorted(want | set(ext))}")
entry = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
if not entry or "tensoralloc-run = tensoralloc.__main__:run_main" not in zipfile.ZipFile(wheel).read(entry[0]).decode():
    sys.exit("FAIL: no tensoralloc-run console script in the wheel's entry points")
zipfile.ZipFile(wheel).extractall(out)
# Every run path is relative to the package: no folder of the build machine.
for n in sorted(n for n in package if n.endswith(".so")):
    dyn = subprocess.run(["readelf", "-d", f"{out}/{n}"], capture_output=True, text=True,
                         check=True).stdout
    for line in dyn.splitlines():
        if "RPATH" in line or "RUNPATH" in line:
            path = line.split("[", 1)[1].rstrip("]")
            if any(not p.startswith("$ORIGIN") for p in path.split(":") if p):
                sys.exit(f"FAIL: {n} has the run path {path}, not relative to the package")
print(f"PASS: the wheel holds {sorted(package)}, run paths relative to the package")
PY

# 2. A fresh virtual environment (the system's site packages give numpy
# and torch; the package itself must come from the wheel).
"$py" -m venv --system-site-packages "$tmp/v"
"$tmp/v/bin/pip" install --quiet --no-index --no-deps "$wheel" >"$tmp/pip.log" 2>&1 ||
    { cat "$tmp/pip.log"; fail "pip install of the wheel"; }
cat >"$tmp/use.py" <<'PY'
import os, sys, tempfile
import tensoralloc as ta
where = sys.argv[1]
assert ta.__file__.startswith(where), f"imported {ta.__file__}, not the package under {where}"
assert ta.preload_path().startswith(where), ta.preload_path()
# every libtensoralloc* mapped is the package's own, whatever LD_LIBRARY_PATH holds
libs = ta._mapped_files("libtensoralloc")
assert libs and all(p.startswith(where) for p in libs), libs
import numpy as np
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "m.safetensors")
    w = np.arange(4 << 20, dtype=np.float32).reshape(4096, 1024)
    ta.save_safetensors(p, {"w": w, "b": np.ones(7, np.float16)})
    cache = ta.ModelCache("64M")
    with cache.load("m", p) as e:
        assert np.array_equal(e.numpy("w"), w) and e.numpy("b").tolist() == [1.0] * 7
        assert cache.stats()["loads"] == 1, cache.stats()
try:
    import torch
except ImportError:
    print("note: torch is not importable here; tensoralloc.torch.install() not tried")
    torch = None
if torch is not None:
    import tensoralloc.torch as tt
    assert tt.library_path().startswith(where), tt.library_path()
    before = ta.stats()["large_live_bytes"]
    tt.install()
    x = torch.ones(8 << 20)
    assert ta.stats()["large_live_bytes"] >= before + x.numel() * 4, ta.stats()
    assert float(x.sum()) == 8 << 20
    del x
    tt.uninstall()
    print("torch: install() made the tensor tensoralloc's")
print(f"PASS: {os.path.dirname(ta.__file__)} imports, caches and views")
PY
site=$("$tmp/v/bin/python" -c 'import sysconfig; print(sysconfig.get_path("platlib"))')
# A libtensoralloc.so of another install on LD_LIBRARY_PATH (the name a
# meson install's development link has) must not replace the package's.
mkdir "$tmp/decoy"
cp "$tmp/unpacked/tensoralloc/libtensoralloc.so" "$tmp/unpacked/tensoralloc/libtensoralloc-torch.so" \
   "$tmp/decoy/"
(cd "$tmp" && LD_LIBRARY_PATH="$tmp/decoy" "$tmp/v/bin/python" "$tmp/use.py" "$site/tensoralloc") ||
    fail "the installed wheel"

# 3. The launchers: a program that checks it runs under the package's
# preload library, and its exit status comes back.
cat >"$tmp/preloaded.py" <<'PY'
import os, sys
maps = open("/proc/self/maps").read()
lib = os.environ["LD_PRELOAD"].split(":")[0]
assert lib.startswith(sys.argv[1]) and lib in maps, (lib, sys.argv[1])
print("preloaded:", lib)
sys.exit(5)
PY
for launcher in "$tmp/v/bin/python -m tensoralloc run" "$tmp/v/bin/tensoralloc-run"; do
    status=0
    (cd "$tmp" && $launcher --threshold 1M -- "$tmp/preloaded.py" "$site/tensoralloc") || status=$?
    [ $status -eq 5 ] || fail "$launcher: exit status $status, not the program's 5"
done
echo "PASS: python -m tensoralloc run and tensoralloc-run start a program preloaded"

# 4. The wheel unpacked elsewhere, used by the system interpreter.
(cd "$tmp" && PYTHONPATH="$tmp/unpacked" "$py" "$tmp/use.py" "$tmp/unpacked/tensoralloc") ||
    fail "the wheel unpacked in another folder"

# 5. pip install . into a second environment, no build isolation.
"$py" -m venv --system-site-packages "$tmp/v2"
"$tmp/v2/bin/pip" install --quiet --no-build-isolation --no-deps "$src" >"$tmp/pip2.log" 2>&1 ||
    { tail -30 "$tmp/pip2.log"; fail "pip install --no-build-isolation ."; }
site2=$("$tmp/v2/bin/python" -c 'import sysconfig; print(sysconfig.get_path("platlib"))')
(cd "$tmp" && "$tmp/v2/bin/python" "$tmp/use.py" "$site2/tensoralloc") || fail "pip install ."
