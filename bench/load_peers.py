#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench/load_peers.py: what else reads the same model files, timed the way
tensoralloc-cache-demo's `load` times the cache, for bench/run -w load.

    load_peers.py METHOD [--rounds N] [--cold] FILE...
    load_peers.py make-pt FILE...      (FILE.pt beside each, for torch-load)

METHOD: dd (bs=64M to /dev/null), dd-direct (iflag=direct), cat (to
/dev/null), numpy (readinto a fresh numpy array of the file's size), or
torch-load (torch.load of FILE.pt, the same tensors as uint8). Each file is
read once per round; --cold drops the page cache before every file (root;
exit 77 with a message where that is refused). Prints key=value lines:
bytes, seconds, gbps (all rounds), steady_gbps (rounds after the first).
"""
import argparse
import os
import struct
import subprocess
import sys
import time


def drop_page_cache():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        print(f"SKIP: cannot drop the page cache ({e}); cold loads need root", file=sys.stderr)
        sys.exit(77)


def read_numpy(path):
    import numpy as np
    size = os.path.getsize(path)
    buf = np.empty(size, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        view, done = memoryview(buf), 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise SystemExit(f"{path}: short read")
            done += n
    return size


def read_torch(path):
    import torch
    tensors = torch.load(path + ".pt")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_tool(args, path):
    subprocess.run(args + [path] if args[0] == "cat" else args + [f"if={path}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return os.path.getsize(path)


METHODS = {
    "dd": lambda p: run_tool(["dd", "of=/dev/null", "bs=64M"], p),
    "dd-direct": lambda p: run_tool(["dd", "of=/dev/null", "bs=64M", "iflag=direct"], p),
    "cat": lambda p: run_tool(["cat"], p),
    "numpy": read_numpy,
    "torch-load": read_torch,
}


def make_pt(files):
    import torch
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            import json
            header = json.loads(f.read(n))
            data = f.read()
        tensors = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            b, e = t["data_offsets"]
            tensors[name] = torch.frombuffer(bytearray(data[b:e]), dtype=torch.uint8) \
                if e > b else torch.empty(0, dtype=torch.uint8)
        torch.save(tensors, path + ".pt")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=sorted(METHODS) + ["make-pt"])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args()
    if a.method == "make-pt":
        make_pt(a.files)
        return 0
    read = METHODS[a.method]
    total = seconds = steady_bytes = steady_seconds = 0
    for r in range(a.rounds):
        for path in a.files:
            if a.cold:
                drop_page_cache()
            t0 = time.monotonic()
            n = read(path)
            dt = time.monotonic() - t0
            total += n
            seconds += dt
            if r > 0 or a.rounds == 1:
                steady_bytes += n
                steady_seconds += dt
    print(f"workload=load\nmode={a.method}\nbytes={total}\nseconds={seconds:.4f}")
    print(f"gbps={total / seconds / 1e9 if seconds else 0:.3f}")
    print(f"steady_gbps={steady_bytes / steady_seconds / 1e9 if steady_seconds else 0:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
