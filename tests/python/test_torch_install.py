# SPDX-License-Identifier: MIT
"""tensoralloc.torch.install(): tensoralloc as PyTorch's CPU allocator in a
running process, no preload. Checked through the allocator's own figures
(ta_stats): tensors made under install() are tensoralloc's, tensors made
before or after are not, and blocks of either kind are freed correctly
after a switch in either direction; torch.save/torch.load,
load_state_dict, DataLoader workers (fork) and two intra-op threads work
under it; a shim built for another torch is refused.

Skips (exit 77, with a message) without torch or without the shim.
"""
import gc
import os
import subprocess
import sys
import tempfile
import unittest

try:
    import torch
except ImportError as e:
    print(f"SKIP: {e} (python3-torch)")
    sys.exit(77)

import tensoralloc
import tensoralloc.torch as ta_torch

if ta_torch.library_path() is None:
    print("SKIP: tensoralloc was built without libtensoralloc-torch "
          "(libtorch's headers and libc10: apt-get install libtorch-dev)")
    sys.exit(77)

MiB = 1 << 20


def live():
    s = tensoralloc.stats()
    return s["large_live_bytes"], s["small_live_bytes"]


class Install(unittest.TestCase):
    def tearDown(self):
        if ta_torch.installed():
            ta_torch.uninstall()
        gc.collect()

    def test_tensors_made_under_install_are_tensoralloc_blocks(self):
        large0, small0 = live()
        before = torch.empty(8 * MiB // 4)  # PyTorch's own allocator
        self.assertEqual(live()[0], large0, "a tensor counted before install()")
        ta_torch.install()
        self.assertTrue(ta_torch.installed())
        big = torch.empty(8 * MiB // 4)
        self.assertGreaterEqual(live()[0], large0 + 8 * MiB)
        small = torch.empty(10)
        self.assertGreaterEqual(live()[1], small0 + 40)
        self.assertEqual(big.data_ptr() % 64, 0)
        self.assertEqual(small.data_ptr() % 64, 0, "c10's 64-byte alignment")
        empty = torch.empty(0)
        self.assertEqual(empty.numel(), 0)
        del big, small, empty
        self.assertEqual(live()[0], large0, "a large tensor's mapping outlived it")
        del before

    def test_switches_in_both_directions_free_each_block_where_it_came_from(self):
        large0, _ = live()
        a = torch.full((4 * MiB // 4,), 1.0)  # PyTorch's allocator
        ta_torch.install()
        b = torch.full((4 * MiB // 4,), 2.0)  # tensoralloc's
        ta_torch.uninstall()
        self.assertFalse(ta_torch.installed())
        c = torch.full((4 * MiB // 4,), 3.0)  # PyTorch's again
        self.assertLess(live()[0], large0 + 8 * MiB, "c is not tensoralloc's")
        self.assertGreaterEqual(live()[0], large0 + 4 * MiB, "b is tensoralloc's")
        del a  # PyTorch's block, freed with tensoralloc out
        del b  # tensoralloc's block, freed after uninstall()
        self.assertEqual(live()[0], large0)
        ta_torch.install()
        d = c * 2  # a new tensor under install
        del c  # PyTorch's block, freed under install
        self.assertEqual(float(d.sum()), 6.0 * (4 * MiB // 4))
        del d
        self.assertEqual(live()[0], large0)

    def test_a_request_past_the_address_space_is_a_runtime_error(self):
        ta_torch.install()
        with self.assertRaisesRegex(RuntimeError, "tensoralloc: out of memory"):
            torch.empty(1 << 50, dtype=torch.uint8)
        self.assertEqual(float(torch.ones(3).sum()), 3.0)

    def test_install_is_idempotent_and_uninstall_checks_its_state(self):
        ta_torch.install()
        ta_torch.install()
        ta_torch.uninstall()
        with self.assertRaisesRegex(RuntimeError, "not installed"):
            ta_torch.uninstall()

    def test_save_load_and_load_state_dict(self):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 10)).eval()
        x = torch.randn(4, 512)
        with torch.no_grad():
            want = model(x)
        ta_torch.install()
        large0, _ = live()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.pt")
            torch.save(model.state_dict(), path)
            sd = torch.load(path)
            self.assertGreaterEqual(live()[0], large0 + 2 * MiB, "torch.load's tensors")
            fresh = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                        torch.nn.Linear(1024, 10)).eval()
            fresh.load_state_dict(sd)
            with torch.no_grad():
                got = fresh(x)
        self.assertTrue(torch.equal(got, want))
        del sd, fresh, got

    def test_dataloader_workers_fork_under_install(self):
        ta_torch.install()

        class Squares(torch.utils.data.Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, i):
                return torch.full((MiB // 4,), float(i))  # a large block in the worker

        loader = torch.utils.data.DataLoader(Squares(), batch_size=8, num_workers=2)
        total = sum(float(batch[:, 0].sum()) for batch in loader)
        self.assertEqual(total, float(sum(range(64))))

    def test_two_intra_op_threads(self):
        old = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            torch.manual_seed(1)
            a, b = torch.randn(384, 384), torch.randn(384, 384)
            want = (a.double() @ b.double()).float()
            ta_torch.install()
            got = (a @ b) + torch.zeros(384, 384)
            self.assertTrue(torch.allclose(got, want, atol=1e-3))
        finally:
            torch.set_num_threads(old)

    def test_under_the_preload_library_too(self):
        preload = os.path.join(os.path.dirname(ta_torch.library_path()),
                               "libtensoralloc-preload.so")
        if not os.path.exists(preload):
            self.skipTest(f"no {preload}")
        code = ("import torch, tensoralloc, tensoralloc.torch as t; t.install();"
                "x = torch.ones(1 << 22); assert t.installed();"
                "assert tensoralloc.stats()['large_live_bytes'] >= 16 << 20; t.uninstall();"
                "print('ok')")
        env = dict(os.environ, LD_PRELOAD=preload)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "ok")

    def test_a_shim_built_for_another_torch_is_refused(self):
        saved_lib, saved_abi = ta_torch._lib, ta_torch._torch_abi
        ta_torch._lib = None
        ta_torch._torch_abi = lambda: ("0.1", 1)
        try:
            with self.assertRaisesRegex(RuntimeError, "built against libtorch .* rebuild"):
                ta_torch.install()
            self.assertFalse(ta_torch.installed())
        finally:
            ta_torch._lib, ta_torch._torch_abi = saved_lib, saved_abi


if __name__ == "__main__":
    unittest.main(verbosity=2)
