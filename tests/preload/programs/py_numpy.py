# SPDX-License-Identifier: MIT
# numpy arrays of many sizes created, transformed and dropped.
import numpy as np
rng = np.random.default_rng(7)
acc = 0.0
for i in range(300):
    n = int(rng.integers(1, 4_000_000))
    a = rng.standard_normal(n).astype(np.float32)
    b = np.sort(a)[::-1].copy()
    acc += float(b[:10].sum()) + float(np.cumsum(a, dtype=np.float64)[-1])
    del a, b
m = rng.standard_normal((1500, 1500))
print(round(acc, 3), round(float(np.linalg.norm(m @ m.T)), 3))
