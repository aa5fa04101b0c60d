# SPDX-License-Identifier: MIT
# Forked children of a Python process: the patterns of pre-forking servers
# and multiprocessing's fork start method. Every wait has a timeout, and a
# child that hangs is killed by its alarm, so a hang fails the test.
import multiprocessing as mp
import os
import signal
import sys
import time


def churn_8mib(times, pause):
    for _ in range(times):
        b = bytearray(8 << 20)
        b[-1] = 1
        del b
        time.sleep(pause)


def fork_after_idle():
    # The parent frees a large block, then waits until the purge thread
    # has emptied the pool and is idle; the child wakes it again and again.
    churn_8mib(1, 1.0)
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        churn_8mib(4, 0.7)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return "exit 0" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else f"status {status}"


def work(n):
    signal.alarm(60)
    blocks = [bytearray((i % 7 + 1) << 20) for i in range(n)]
    small = {str(i): [i] * 10 for i in range(5000)}
    total = sum(len(b) for b in blocks) + len(small)
    del blocks, small
    time.sleep(0.05)
    return total


def pool_fork():
    churn_8mib(1, 0.8)  # the parent's purge thread is idle when the workers fork
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        results = [pool.map_async(work, range(1, 9)).get(timeout=120) for _ in range(5)]
    return sum(sum(r) for r in results)


if __name__ == "__main__":
    print("fork after idle:", fork_after_idle())
    print("multiprocessing fork pool:", pool_fork())
    sys.stdout.flush()
