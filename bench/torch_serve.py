#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""The C++ libtorch server (tools/torch_serve.cpp) against glibc.

    bench/torch_serve.py --serve BUILD/tools/tensoralloc-torch-serve [--models resnet50,...]
                         [--budget-mib N] [--requests N] [--reps N] [--dir DIR]

Exports torchvision models (random weights, nothing downloaded) as
TorchScript (torch.jit.trace) with their weights as safetensors, computes
each model's output in Python, then runs the server with PyTorch's own
allocator and with tensoralloc linked (ta_torch_install), its weights by
torch::jit::load or through the model cache, interleaved in every order,
and prints medians: time per switch, RSS after evictions, RSS when the
models are dropped and one second later. Every run's outputs are compared
with Python's, bit for bit. docs/benchmarks.md, "A C++ server on libtorch".
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

INPUT_SHAPE = (1, 3, 64, 64)


def export(directory, names, seed=0):
    """MODEL.pt, MODEL.safetensors and MODEL.ref (Python's output, float32)
    for each torchvision model name, and input.bin; returns the .pt paths."""
    import torch
    import torchvision
    import tensoralloc as ta
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x = torch.rand(INPUT_SHAPE)
    x.numpy().tofile(os.path.join(directory, "input.bin"))
    paths = []
    for name in names:
        model = getattr(torchvision.models, name)(weights=None).eval()
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
        pt = os.path.join(directory, name + ".pt")
        traced.save(pt)
        # The reference: the saved TorchScript, loaded back, as the server runs it.
        loaded = torch.jit.load(pt).eval()
        with torch.no_grad():
            loaded(x).float().numpy().tofile(os.path.join(directory, name + ".ref"))
        ta.save_safetensors(os.path.join(directory, name + ".safetensors"),
                            {k: v.contiguous() for k, v in model.state_dict().items()})
        paths.append(pt)
    return paths


def input_arg(directory):
    return f"{directory}/input.bin:" + "x".join(map(str, INPUT_SHAPE))


def run(serve, directory, paths, allocator, weights, budget_mib, requests, outputs, env=None):
    """The server's summary as a dict, its request lines, and whether every
    output file equals Python's."""
    os.makedirs(outputs, exist_ok=True)
    r = subprocess.run([serve, "--allocator", allocator, "--weights", weights,
                        "--budget-mib", str(budget_mib), "--requests", str(requests),
                        "--input", input_arg(directory), "--outputs", outputs, *paths],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, **(env or {})))
    if r.returncode != 0:
        raise RuntimeError(f"{allocator}/{weights}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    lines = r.stdout.splitlines()
    summary = lines[-1].split()
    assert summary[0] == "summary", lines[-1]
    result = {summary[i]: summary[i + 1] for i in range(1, len(summary) - 1, 2)}
    # "request N model NAME hit 0 load_ms ...": the pairs after the number
    requests_seen = [dict(zip(words[2::2], words[3::2]))
                     for words in (l.split() for l in lines if l.startswith("request "))]
    same = {}
    for pt in paths:
        name = os.path.splitext(os.path.basename(pt))[0]
        ours = np.fromfile(os.path.join(outputs, name + ".out"), dtype=np.float32)
        ref = np.fromfile(os.path.join(directory, name + ".ref"), dtype=np.float32)
        same[name] = ours.shape == ref.shape and np.array_equal(ours, ref)
    return result, requests_seen, same


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", required=True, help="the tensoralloc-torch-serve program")
    ap.add_argument("--models", default="resnet50,vgg11,densenet121,efficientnet_b0,convnext_tiny")
    ap.add_argument("--budget-mib", type=int, default=700)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", help="where the models go (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or tmp
        os.makedirs(directory, exist_ok=True)
        paths = export(directory, args.models.split(","))
        sizes = {os.path.basename(p): os.path.getsize(p) >> 20 for p in paths}
        print(f"models (MiB): {sizes}; budget {args.budget_mib} MiB; {args.requests} requests")
        # tensoralloc as it comes (freed mappings kept up to 500 ms for
        # reuse), and with its retain pool off (unmapped at once).
        configs = [(a, w, label) for w in ("jit", "cache")
                   for a, label in (("default", ""), ("tensoralloc", ""),
                                    ("tensoralloc", "RETAIN_BYTES=0"))]
        results = {c: [] for c in configs}
        for rep in range(args.reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for config in (order if rep % 2 == 0 else order[::-1]):
                alloc, weights, label = config
                env = {"TENSORALLOC_" + label.split("=")[0]: label.split("=")[1]} if label else {}
                summary, reqs, same = run(args.serve, directory, paths, alloc, weights,
                                          args.budget_mib, args.requests,
                                          os.path.join(tmp, "out"), env)
                if not all(same.values()):
                    sys.exit(f"FAIL: {config}: outputs differ from Python's: {same}")
                evict_rss = [float(r["rss_after_evict_mib"]) for r in reqs
                             if float(r["rss_after_evict_mib"]) >= 0]
                summary["rss_after_evict_median"] = (statistics.median(evict_rss) if evict_rss
                                                     else float(summary["rss_start_mib"]))
                results[config].append(summary)
        print("RSS figures above the RSS before the first model (libtorch loaded)")
        print("| weights | allocator | switch ms (median of medians) | all switches s (min-max) | "
              "RSS after evictions MiB | all dropped MiB | +1 s MiB | outputs = Python's |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (alloc, weights, label), runs in results.items():
            med = lambda key, base=0: statistics.median(float(r[key]) - (float(r["rss_start_mib"])
                                                        if base else 0) for r in runs)
            totals = sorted(float(r["switch_ms_total"]) / 1000 for r in runs)
            print(f"| {weights} | {alloc}{' (' + label + ')' if label else ''} | "
                  f"{med('switch_ms_median'):.0f} | {med('switch_ms_total') / 1000:.2f} "
                  f"({totals[0]:.2f}-{totals[-1]:.2f}) | "
                  f"{med('rss_after_evict_median', 1):.0f} | {med('rss_dropped_mib', 1):.0f} | "
                  f"{med('rss_dropped_1s_mib', 1):.0f} | yes |")


if __name__ == "__main__":
    main()
