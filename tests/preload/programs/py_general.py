# SPDX-License-Identifier: MIT
# Plain Python under the preload library: threads, big lists and dicts,
# json and re; prints digests that any correct allocator reproduces.
import hashlib, json, re, threading

def work(seed, out):
    d = {}
    for i in range(200000):
        d[f"k{seed}-{i}"] = [i, str(i) * (i % 7), {"x": i % 13}]
    text = json.dumps(d)
    back = json.loads(text)
    words = re.findall(r"k\d+-(\d+)7\"", text)
    out[seed] = (len(back), len(words), hashlib.sha256(text.encode()).hexdigest()[:16])

out = {}
threads = [threading.Thread(target=work, args=(s, out)) for s in range(4)]
for t in threads: t.start()
for t in threads: t.join()
big = list(range(3_000_000))
big2 = [x * 2 for x in big if x % 3]
blob = b"".join(i.to_bytes(4, "little") for i in range(500000))
print(sorted(out.items()), sum(big2), hashlib.md5(blob).hexdigest())
