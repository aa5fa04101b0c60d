# SPDX-License-Identifier: MIT
"""Read tensoralloc's statistics from a Python process running under the
preload library (tensoralloc-run python app.py, or LD_PRELOAD=...).

ctypes only. Note: ctypes.CDLL("libc.so.6").mallinfo2 calls glibc's own
mallinfo2, which reports glibc's arenas: idle under tensoralloc. The
mallinfo2 resolved through the process's global namespace (CDLL(None)) is
tensoralloc's, and so are ta_stats_get and ta_trim used here.

    import tensoralloc
    before = tensoralloc.snapshot()
    load_model()
    print(tensoralloc.diff(before, tensoralloc.snapshot()))
"""
import ctypes
import os

__all__ = ["available", "mallinfo2", "stats", "snapshot", "diff", "trim", "version"]

_STAT_FIELDS = [
    "large_live_bytes", "large_peak_bytes", "large_live_count", "large_mapped_bytes",
    "large_alloc_count", "pool_bytes", "pool_entries", "pool_hits", "pool_misses",
    "pool_expired", "maxmap_fallbacks", "map_limit", "small_live_bytes", "small_peak_bytes",
    "small_committed_bytes", "small_dirty_bytes", "small_segment_bytes", "small_spans",
    "heaps", "os_map_calls", "os_unmap_calls", "os_remap_calls", "os_madvise_calls",
    "os_map_failures", "opt_threshold", "opt_retain_bytes", "opt_retain_ms", "opt_thp",
    "opt_verbose", "mappings", "os_unmap_failures", "os_advise_failures", "parked_count",
    "parked_bytes", "small_remote_released_bytes",
]


class _Stats(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("version", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32)] + [(f, ctypes.c_uint64) for f in _STAT_FIELDS]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_lib = ctypes.CDLL(None)  # the global namespace: the preloaded library's symbols


def available():
    """True when tensoralloc is loaded in this process."""
    return hasattr(_lib, "ta_stats_get")


def _need():
    if not available():
        raise RuntimeError("tensoralloc is not loaded: run under tensoralloc-run "
                           "or LD_PRELOAD=libtensoralloc-preload.so")


def version():
    _need()
    _lib.ta_version.restype = ctypes.c_char_p
    return _lib.ta_version().decode()


def mallinfo2():
    """tensoralloc's figures in glibc's struct mallinfo2 shape, as a dict."""
    _need()
    _lib.ta_mallinfo2.restype = _Mallinfo2
    mi = _lib.ta_mallinfo2()
    return {name: getattr(mi, name) for name, _ in _Mallinfo2._fields_}


def stats():
    """The full ta_stats_t as a dict."""
    _need()
    st = _Stats()
    st.size = ctypes.sizeof(st)
    rc = _lib.ta_stats_get(ctypes.byref(st))
    if rc != 0:
        raise OSError(rc, os.strerror(rc))
    out = {"version": st.version}
    out.update({f: getattr(st, f) for f in _STAT_FIELDS})
    return out


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def snapshot():
    """Process RSS plus the allocator's figures, for diff()."""
    _need()
    mi = mallinfo2()
    st = stats()
    return {
        "rss": _rss_bytes(),
        "large_mapped": mi["hblkhd"],
        "large_blocks": mi["hblks"],
        "small_in_use": mi["uordblks"],
        "small_free": mi["fordblks"],
        "pool": mi["keepcost"],
        "total_mapped": mi["hblkhd"] + st["small_segment_bytes"] + st["pool_bytes"],
    }


def _fmt(n):
    sign = "-" if n < 0 else "+"
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.2f} {unit}" if unit != "B" else f"{sign}{n} B"
        n /= 1024


def diff(before, after):
    """One line per metric: name, before, after, change."""
    lines = []
    for key in before:
        b, a = before[key], after[key]
        if key == "large_blocks":
            lines.append(f"{key}: {b} -> {a} ({a - b:+d})")
        else:
            lines.append(f"{key}: {b / 2**20:.1f} MiB -> {a / 2**20:.1f} MiB ({_fmt(a - b)})")
    return "\n".join(lines)


def trim():
    """Give retained memory back to the kernel now (ta_trim)."""
    _need()
    _lib.ta_trim()
