"""heap.release(): freed memory that glibc kept goes back to the system, and nothing anyone holds changes."""
import platform
import subprocess
import sys

import pytest

PROGRAM = r"""
import os, sys
from logitify_cli import heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

# 100 KB buffers (below glibc's mmap threshold, so inside its heap), each
# followed by a 1 KB one that stays: freeing the big ones leaves holes that
# free() itself never gives back.
big, kept = [], []
for i in range(2000):
    big.append(bytearray(100_000))
    kept.append(bytearray(b"%d" % i) * (1000 // len(b"%d" % i)))
want = [bytes(k) for k in kept]
del big
freed = rss()
heap.release()
heap.now_and_then()  # (at most once a second: asking again at once is cheap and harmless)
after = rss()
assert [bytes(k) for k in kept] == want
print(freed - after)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_gives_freed_pages_back():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 100 << 20  # of the 200 MB freed


def test_release_is_harmless_anywhere():
    from logitify_cli import heap

    heap.release()
    heap.now_and_then()
