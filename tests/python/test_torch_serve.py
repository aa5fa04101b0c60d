#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""The C++ libtorch server (tools/torch_serve.cpp), tensoralloc linked:
TorchScript models exported here from torchvision (random weights) served
under a budget that forces evictions, with PyTorch's own allocator and
with tensoralloc's (ta_torch_install), weights by torch::jit::load and
through the model cache (zero-copy at::Tensors); every output equal to
Python's, bit for bit. Skips (77) without torch and torchvision.

    test_torch_serve.py SERVE_PROGRAM
"""
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError as e:
    print(f"SKIP: {e} (apt-get install python3-torch python3-torchvision)")
    sys.exit(77)
import torch_serve  # bench/torch_serve.py

SERVE = sys.argv.pop(1) if len(sys.argv) > 1 else None
MODELS = ["resnet18", "mobilenet_v2", "squeezenet1_1"]  # 45, 14 and 5 MiB


class Server(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.paths = torch_serve.export(cls.dir, MODELS)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def serve(self, allocator, weights, budget_mib=60, requests=9):
        return torch_serve.run(SERVE, self.dir, self.paths, allocator, weights, budget_mib,
                               requests, os.path.join(self.dir, f"out-{allocator}-{weights}"))

    def check_run(self, allocator, weights):
        summary, requests, same = self.serve(allocator, weights)
        self.assertEqual(same, {m: True for m in MODELS}, "outputs equal Python's, bit for bit")
        self.assertEqual(summary["mismatches"], "0", "every request's output equals the first")
        self.assertEqual(len(requests), 9)
        self.assertGreaterEqual(int(summary["evictions"]), 6, "the budget forced evictions")
        # a 60 MiB budget holds resnet18 with one of the others, never all three
        self.assertTrue(all(r["hit"] == "0" for r in requests), requests)
        return summary

    def test_default_allocator_jit(self):
        summary = self.check_run("default", "jit")
        self.assertEqual(summary["ta_large_allocs"], "0", "PyTorch's own allocator served it")

    def test_tensoralloc_linked_jit(self):
        summary = self.check_run("tensoralloc", "jit")
        # resnet18's 62 tensors alone are 9 times in memory over the run
        self.assertGreater(int(summary["ta_large_allocs"]), 100, "the tensors were tensoralloc's")

    def test_weights_through_the_cache(self):
        for allocator in ("default", "tensoralloc"):
            with self.subTest(allocator=allocator):
                # the server checks each bound tensor's data pointer is the
                # entry's (no copy), and removes each evicted entry, which
                # fails (EBUSY) unless the tensors' deleters unlocked it
                self.check_run(allocator, "cache")

    def test_bad_usage_is_refused_with_a_message(self):
        for args, message in ((["--weights", "mmap", "x.pt"], "--weights takes jit or cache"),
                              (["--budget-mib", "0", "x.pt"], "--budget-mib takes a whole number"),
                              (["--input", "in.bin", "x.pt"], "--input takes FILE:DIMS"),
                              ([], "no model given")):
            r = subprocess.run([SERVE, *args], capture_output=True, text=True)
            self.assertEqual(r.returncode, 2, args)
            self.assertIn(message, r.stderr, args)
        r = subprocess.run([SERVE, "--weights", "cache", os.path.join(self.dir, "none.pt")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertIn("none.pt", r.stderr)


if __name__ == "__main__":
    if SERVE is None or not os.access(SERVE, os.X_OK):
        sys.exit(f"usage: {sys.argv[0]} SERVE_PROGRAM (the tensoralloc-torch-serve build)")
    unittest.main(verbosity=2)
