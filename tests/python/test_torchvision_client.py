# SPDX-License-Identifier: MIT
"""A real client of tensoralloc.ModelCache: torchvision models (random
weights, nothing downloaded) saved with ta.save_safetensors, then switched
through the cache under a budget smaller than the two largest together, the
way an app's model manager switches models. Every forward pass must equal,
bit for bit, the pass of the model the state dict was taken from.

Skips (exit 77, with a message) without torch or torchvision.
"""
import gc
import os
import shutil
import sys
import tempfile

try:
    import torch
    import torchvision
except ImportError as e:
    print(f"SKIP: {e} (python3-torch, python3-torchvision)")
    sys.exit(77)

import tensoralloc as ta

MODELS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "squeezenet1_1"]


def main():
    torch.set_num_threads(1)  # one order of floating-point sums: bit-exact passes
    work = tempfile.mkdtemp(prefix="ta-tv-")
    try:
        x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
        paths, reference, sizes = {}, {}, {}
        for i, name in enumerate(MODELS):
            torch.manual_seed(100 + i)
            m = getattr(torchvision.models, name)(weights=None).eval()
            with torch.no_grad():
                reference[name] = m(x)
            sd = m.state_dict()
            sizes[name] = sum(t.numel() * t.element_size() for t in sd.values())
            paths[name] = os.path.join(work, name + ".safetensors")
            ta.save_safetensors(paths[name], sd, metadata={"arch": name})
        largest = sorted(sizes.values())[-2:]
        budget = max(largest) + (min(largest) // 2)  # the two largest do not fit together
        assert budget < sum(largest)
        cache = ta.ModelCache(budget)
        order = MODELS + MODELS[::-1] + [MODELS[0], MODELS[2], MODELS[0], MODELS[1]]
        for step, name in enumerate(order):
            with cache.load(name, paths[name]) as entry:
                torch.manual_seed(999)  # another random init, overwritten below
                model = getattr(torchvision.models, name)(weights=None).eval()
                missing = model.load_state_dict(entry.state_dict())
                assert not missing.missing_keys and not missing.unexpected_keys, missing
            with torch.no_grad():
                out = model(x)
            if not torch.equal(out, reference[name]):
                diff = (out - reference[name]).abs().max().item()
                print(f"FAIL step {step}: {name} differs (max {diff})")
                return 1
            s = cache.stats()
            assert s["ram_used"] <= s["ram_budget"], s
            print(f"step {step}: {name} ({sizes[name] / 1e6:.1f} MB) bit-exact; "
                  f"in cache {cache.keys()}, {s['ram_used'] / 1e6:.1f} of {budget / 1e6:.1f} MB")
            del model
            gc.collect()
        s = cache.stats()
        assert s["cleared"] > 0, "the budget never made the cache evict"
        assert s["hits"] > 0, "no switch hit the cache"
        print(f"PASS: {len(order)} switches, {s['loads']} loads, {s['hits']} hits, "
              f"{s['cleared']} evictions, every pass bit-exact")
        cache.close()
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
