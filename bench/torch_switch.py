#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""torch-switch: a PyTorch model cache switching between state dicts.

A few state dicts of different shapes are saved to disk (by a child
process, so that making them does not count), then loaded, converted
(fp32 -> fp16 -> fp32, as a cache does when it moves models between
devices and dtypes), kept in an LRU cache under a byte budget and evicted.
Reports time, peak RSS, and RSS once the cache is cleared, relative to the
RSS before the first load. Prints key=value lines for bench/run.

py-cache-switch is the same switching without the conversions
(--no-convert): torch.load of .pt files into a dict LRU (--mode torch,
under any allocator), against tensoralloc.ModelCache loading the same
tensors from .safetensors files (--mode cache; views of the cache's
memory, nothing copied).
"""
import argparse
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


# --torchvision: real architectures (random weights, nothing downloaded),
# from 5 MiB to 500 MiB of fp32 state dict; --models N takes the first N.
TORCHVISION = ["resnet50", "mobilenet_v2", "vgg11", "densenet121", "efficientnet_b0",
               "convnext_tiny", "resnet18", "vit_b_16", "regnet_y_1_6gf", "squeezenet1_1"]


def prepare_torchvision(directory, models):
    import torch
    import torchvision
    for m, name in enumerate(TORCHVISION[:models]):
        torch.manual_seed(m)
        sd = getattr(torchvision.models, name)(weights=None).state_dict()
        torch.save(sd, os.path.join(directory, f"model{m}.pt"))


def prepare(directory, models, scale):
    import torch
    torch.manual_seed(0)
    for m in range(models):
        layers = 8 + 6 * m
        width = int((512 + 256 * m) * scale)
        sd = {}
        for i in range(layers):
            sd[f"layer{i}.weight"] = torch.randn(width, width)
            sd[f"layer{i}.bias"] = torch.randn(width)
            sd[f"layer{i}.norm"] = torch.ones(width)
        sd["embed"] = torch.randn(width * 4, width)
        torch.save(sd, os.path.join(directory, f"model{m}.pt"))
        try:
            import tensoralloc
        except ImportError:
            continue  # --mode cache reports it
        tensoralloc.save_safetensors(os.path.join(directory, f"model{m}.safetensors"), sd)


def switch_with_torch_load(d, order, budget, convert):
    import torch
    cache, sizes = OrderedDict(), {}
    loads = hits = 0
    for m in order:
        if m in cache:
            cache.move_to_end(m)
            hits += 1
            continue
        sd = torch.load(os.path.join(d, f"model{m}.pt"), map_location="cpu")
        if convert:
            sd = {k: v.to(torch.float16) for k, v in sd.items()}  # convert
            sd = {k: v.to(torch.float32) for k, v in sd.items()}  # and back
        size = sum(v.numel() * v.element_size() for v in sd.values())
        while cache and sum(sizes[k] for k in cache) + size > budget:
            old, _ = cache.popitem(last=False)
            del _
        cache[m] = sd
        sizes[m] = size
        del sd
        loads += 1
    cache.clear()
    return loads, hits


def switch_through_cache(d, order, budget):
    import tensoralloc
    cache = tensoralloc.ModelCache(budget)
    for m in order:
        with cache.load(f"model{m}", os.path.join(d, f"model{m}.safetensors")) as e:
            sd = e.state_dict()  # torch tensors over the cache's memory
            del sd
    s = cache.stats()
    cache.close()
    return s["loads"], s["hits"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--budget-mib", type=int, default=400)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--prepare", metavar="DIR")
    ap.add_argument("--mode", choices=["torch", "cache"], default="torch")
    ap.add_argument("--no-convert", action="store_true")
    ap.add_argument("--torchvision", action="store_true",
                    help="real torchvision architectures' state dicts (random weights)")
    ap.add_argument("--install", action="store_true",
                    help="tensoralloc.torch.install() first: tensoralloc as PyTorch's CPU "
                         "allocator, no preload (PYTHONPATH=BUILD/tools/python)")
    args = ap.parse_args()
    if args.torchvision:
        args.models = min(args.models, len(TORCHVISION))
    if args.prepare:
        if args.torchvision:
            prepare_torchvision(args.prepare, args.models)
        else:
            prepare(args.prepare, args.models, args.scale)
        return 0
    try:
        import torch
    except ImportError:
        print("torch-switch: torch is not importable", file=sys.stderr)
        return 77
    if args.mode == "cache":
        try:
            import tensoralloc
        except ImportError:
            print("py-cache-switch: the tensoralloc package is not importable "
                  "(PYTHONPATH=BUILD/tools/python)", file=sys.stderr)
            return 77
    if args.torchvision:
        try:
            import torchvision  # noqa: F401 (the child that prepares needs it)
        except ImportError:
            print("torchvision-switch: torchvision is not importable", file=sys.stderr)
            return 77
    if args.install:
        try:
            import tensoralloc.torch
        except ImportError:
            print("--install: the tensoralloc package is not importable "
                  "(PYTHONPATH=BUILD/tools/python)", file=sys.stderr)
            return 77
        if tensoralloc.torch.library_path() is None:
            print("--install: tensoralloc was built without libtensoralloc-torch "
                  "(libtorch-dev)", file=sys.stderr)
            return 77
        tensoralloc.torch.install()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        # The files are written the same way under every allocator (no preload
        # in the child), so that what is timed differs only in the allocator.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        subprocess.run([sys.executable, __file__, "--prepare", d, "--models", str(args.models),
                        "--scale", str(args.scale)] + (["--torchvision"] if args.torchvision
                                                       else []), check=True, env=env)
        # The files just written go to disk now, not while the loop is timed.
        os.sync()
        gc.collect()
        rss_start = status_bytes("VmRSS")
        budget = args.budget_mib << 20
        cache = OrderedDict()
        sizes = {}
        state, order = 12345, []
        for _ in range(args.switches):  # a fixed pseudo-random switching order
            state = (state * 1103515245 + 12345) % 2**31
            order.append((state >> 16) % args.models)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu0 = time.process_time()
        t0 = time.monotonic()
        if args.mode == "cache":
            loads, hits = switch_through_cache(d, order, budget)
        else:
            loads, hits = switch_with_torch_load(d, order, budget, not args.no_convert)
        gc.collect()
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        rss_clear = status_bytes("VmRSS")
        time.sleep(1)
        rss_1s = status_bytes("VmRSS")
        mib = 1 << 20
        name = "py-cache-switch" if args.no_convert else "torch-switch"
        print(f"workload={'torchvision-switch' if args.torchvision else name}")
        print(f"wall_s={wall:.4f}")
        print(f"cpu_s={cpu:.4f}")
        print(f"page_faults={faults}")
        print(f"peak_rss_mib={status_bytes('VmHWM') / mib:.1f}")
        print(f"rss_start_mib={rss_start / mib:.1f}")
        print(f"peak_above_start_mib={(status_bytes('VmHWM') - rss_start) / mib:.1f}")
        print(f"rss_cleared_above_start_mib={(rss_clear - rss_start) / mib:.1f}")
        print(f"rss_1s_above_start_mib={(rss_1s - rss_start) / mib:.1f}")
        print(f"loads={loads}")
        print(f"hits={hits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
