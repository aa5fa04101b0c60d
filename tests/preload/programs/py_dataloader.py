# SPDX-License-Identifier: MIT
# A PyTorch DataLoader with two forked workers over 20 epochs whose items
# are large tensors: what a training or serving process does between model
# loads. A worker that hangs makes the loader time out, which fails the test.
# Run with TENSORALLOC_RETAIN_MS=20 (meson.build) and a pause per item, so
# that each worker's purge thread goes idle and is woken many times.
import time

import torch
from torch.utils.data import DataLoader, Dataset

torch.set_num_threads(1)


class Big(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        n = (1 + (i // 2) % 4) << 20  # 4-16 MiB of float32, equal within a batch
        time.sleep(0.05)
        return torch.ones(n) * float(torch.randint(0, 9, (1,), generator=g).item())


def main():
    x = torch.randn(4 << 20)  # a large block freed before the workers fork
    del x
    time.sleep(0.8)
    loader = DataLoader(Big(), batch_size=2, num_workers=2, timeout=60,
                        multiprocessing_context="fork")
    total = 0.0
    for epoch in range(20):
        time.sleep(0.1)  # the parent's purge thread is idle when the workers fork
        for batch in loader:
            total += float(batch.sum())
    print("20 epochs, total", round(total, 1))


if __name__ == "__main__":
    main()
