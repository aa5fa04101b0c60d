# SPDX-License-Identifier: MIT
# python-json: a dict- and string-heavy Python program, the small-object
# load every preloaded Python process carries: build records, serialise
# them to JSON and back, index and sort them, drop them. Reports wall time
# and peak RSS in bench/run's key=value format.
import json
import sys
import time


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 30
    t0 = time.monotonic()
    checksum = 0
    for r in range(rounds):
        records = [{"id": i, "name": f"item-{i}-{r}", "tags": [str(i % 7), str(i % 11)],
                    "score": (i * 7919 + r) % 1000 / 10.0} for i in range(20000)]
        text = json.dumps(records)
        back = json.loads(text)
        by_tag = {}
        for rec in back:
            for t in rec["tags"]:
                by_tag.setdefault(t, []).append(rec["id"])
        top = sorted(back, key=lambda x: (-x["score"], x["name"]))[:100]
        checksum += len(text) + sum(len(v) for v in by_tag.values()) + top[0]["id"]
        del records, back, by_tag, top, text
    wall = time.monotonic() - t0
    print("workload=python-json")
    print(f"checksum={checksum}")
    print(f"wall_s={wall:.6g}")
    print(f"peak_rss_mib={status_kib('VmHWM') / 1024:.6g}")


if __name__ == "__main__":
    main()
