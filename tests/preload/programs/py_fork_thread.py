# SPDX-License-Identifier: MIT
# A child forked by a non-main thread after the purge thread has run:
# the child's only thread starts and joins one more thread, then ends as a
# thread (it returns from the thread's function, it does not call exit).
# A process ends when its last thread ends; under glibc the child is gone
# at once. Before tensoralloc's purge thread learned to end, the child
# lived on as a zombie leader with one live thread (the purge thread) and
# its parent waited for ever. Every wait here has a deadline.
import os
import sys
import threading
import time


def churn(times):
    for _ in range(times):
        b = bytearray(8 << 20)
        b[-1] = 1
        del b


def child_body():
    churn(2)
    t = threading.Thread(target=churn, args=(2,))
    t.start()
    t.join()
    # returning ends this thread: the child's last one


def forker(result):
    churn(2)
    pid = os.fork()
    if pid == 0:
        child_body()
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            result.append("child ended, exit %d" % os.waitstatus_to_exitcode(status))
            return
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    result.append("child still alive after 15 s (killed)")


def main():
    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process (3.12+)
    churn(3)
    for round_ in range(3):
        result = []
        t = threading.Thread(target=forker, args=(result,))
        t.start()
        t.join()
        if not result:  # the child's copy of this thread returns here: nothing to print
            return
        print("round %d: %s" % (round_, result[0]))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
