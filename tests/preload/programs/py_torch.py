# SPDX-License-Identifier: MIT
# torch CPU tensors of many sizes: create, convert, compute, drop.
import torch
torch.manual_seed(0)
torch.set_num_threads(2)
total = 0.0
for i in range(200):
    n = int(torch.randint(1, 3_000_000, (1,)).item())
    t = torch.randn(n)
    h = t.to(torch.float16).to(torch.float64)
    total += float(h.abs().sum())
    state = {f"w{j}": torch.ones(j * 1000 + 1) * j for j in range(20)}
    total += sum(float(v[0]) for v in state.values())
    del t, h, state
w = torch.randn(512, 512)
x = torch.randn(64, 512)
print(round(total, 1), round(float((x @ w).relu().sum()), 2))
