# SPDX-License-Identifier: MIT
"""tensoralloc from Python: the model cache with zero-copy numpy and torch
views over its memory, safetensors writing, memory snapshots and the
allocator's statistics. docs/python.md has the whole contract.

    import tensoralloc as ta
    cache = ta.ModelCache("8G")
    with cache.load("unet", "unet.safetensors") as entry:
        weights = entry.state_dict()        # torch tensors over the cache's memory
    # the views keep the entry locked until they are garbage-collected
"""
import json
import logging
import os
import re
import struct

from . import _tensoralloc as _c
from ._tensoralloc import CacheFullError, FormatError, NoDeviceError

if not hasattr(_c, "DTYPE_SIZES"):  # an older install's extension, imported before .abi3.so
    raise ImportError(f"{_c.__file__} is older than this package: remove it and install again")

__version__ = _c.library_version
__all__ = ["ModelCache", "Entry", "save_safetensors", "FormatError", "CacheFullError",
           "NoDeviceError", "MemorySnapshot", "get_pretty_snapshot_diff", "mallinfo2", "stats",
           "trim", "pressure_signal", "parse_bytes", "budget_rule", "preload_path", "NUMPY_DTYPES", "TORCH_DTYPES"]

# safetensors dtype -> numpy dtype name. numpy has no bfloat16 and no 8-bit
# floats: their bits come as uint16 and uint8 (entry.torch gives the real
# type; save_safetensors(dtypes={name: "BF16"}) writes them back as such).
NUMPY_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
                "F16": "float16", "BF16": "uint16", "U32": "uint32", "I32": "int32",
                "F32": "float32", "U64": "uint64", "I64": "int64", "F64": "float64",
                "F8_E4M3": "uint8", "F8_E5M2": "uint8"}
# safetensors dtype -> torch dtype names, the first this torch has. torch
# before 2.1 has no float8 types and before 2.3 no uint16/32/64: those come
# as the same bits in the type after them.
TORCH_DTYPES = {"BOOL": ["bool"], "U8": ["uint8"], "I8": ["int8"], "U16": ["uint16", "int16"],
                "I16": ["int16"], "F16": ["float16"], "BF16": ["bfloat16"],
                "U32": ["uint32", "int32"], "I32": ["int32"], "F32": ["float32"],
                "U64": ["uint64", "int64"], "I64": ["int64"], "F64": ["float64"],
                "F8_E4M3": ["float8_e4m3fn", "uint8"], "F8_E5M2": ["float8_e5m2", "uint8"]}
# The library's own tables come from the extension, not from here:
# _c.DTYPE_SIZES (safetensors dtype -> bytes per element, from ta_dtype_name
# and ta_dtype_size), _c.PAGE_CACHE_MODES and _c.OVERFLOW_MODES (name ->
# ta_page_cache_t / ta_overflow_t value).
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value):
    """An int, or a string such as "512M", "8G", "1.5GiB" (binary units)."""
    if isinstance(value, bool):
        raise TypeError("a byte count, not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative byte count {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
        raise ValueError(f"not a byte count: {value!r} (an int, or a number with K, M, G or T)")
    raise TypeError(f"a byte count is an int or a string, not {type(value).__name__}")


def budget_rule(memory=0, vram_budget=0, device_working_mem=0):
    """The RAM budget a ModelCache(0) gets (ta_cache_budget_rule)."""
    return _c.budget_rule(memory, vram_budget, device_working_mem)


def _one_of(names):
    """'a', 'b' or 'c'."""
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _log_callable(log):
    if log is None or callable(log) and not isinstance(log, logging.Logger):
        return log
    if isinstance(log, logging.Logger):
        levels = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
                  "debug": logging.DEBUG}
        return lambda level, message: log.log(levels[level], message)
    raise TypeError("log is a callable(level, message), a logging.Logger or None")


class ModelCache:
    """Models (safetensors files) in memory under RAM and VRAM budgets,
    least recently used evicted first; see docs/python.md."""

    def __init__(self, ram_budget, vram_budget=0, device=0, keep_ram_copy=True,
                 overflow="refuse", log=None, load_threads=0, page_cache="keep", keep_alive=0,
                 give_way=True, pressure_floor=0, on_pressure=None):
        if overflow not in _c.OVERFLOW_MODES:
            raise ValueError(f"overflow is {_one_of(_c.OVERFLOW_MODES)}, not {overflow!r}")
        if page_cache not in _c.PAGE_CACHE_MODES:
            raise ValueError(f"page_cache is {_one_of(_c.PAGE_CACHE_MODES)}, not {page_cache!r}")
        if keep_alive < 0:
            raise ValueError("keep_alive (seconds) must be >= 0")
        if on_pressure is not None and not callable(on_pressure):
            raise TypeError("on_pressure is a callable(event: dict) or None")
        self._cache = _c.Cache(parse_bytes(ram_budget), parse_bytes(vram_budget), int(device),
                               bool(keep_ram_copy), _c.OVERFLOW_MODES[overflow],
                               _log_callable(log), int(load_threads),
                               _c.PAGE_CACHE_MODES[page_cache],
                               int(keep_alive * 1000), bool(give_way),
                               parse_bytes(pressure_floor), on_pressure)

    def load(self, key, path, to_device=False):
        """The entry for key, locked: the cached one (a hit), else path's
        safetensors file loaded (a miss). to_device: straight to the GPU."""
        return Entry(self._cache.load(str(key), os.fspath(path), bool(to_device)))

    def get(self, key):
        """The cached entry, locked, or None."""
        h = self._cache.get(str(key))
        return Entry(h) if h is not None else None

    def remove(self, key):
        """Evict key now (KeyError if absent, RuntimeError while locked)."""
        self._cache.remove(str(key))

    def __contains__(self, key):
        return self._cache.contains(str(key))

    def __len__(self):
        return len(self._cache.keys())

    def keys(self):
        """The keys, least recently used first."""
        return self._cache.keys()

    def stats(self):
        """InvokeAI's CacheStats fields and the cache's own, as a dict."""
        s = json.loads(self._cache.stats_json())
        s["ram_budget"] = s["cache_size"]
        # a move under live views takes a second lock through a get, which
        # the C cache counts as a hit: not one of the caller's
        s["hits"] -= self._cache.hold_hits
        return s

    def close(self):
        """No calls after this (they raise ValueError). Calls that other
        threads have in flight finish, and memory under live views stays
        valid: the cache is freed when the last call, entry and view are
        gone."""
        self._cache.close()

    @property
    def closed(self):
        return self._cache.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Entry:
    """A locked cache entry; close() (or the end of a with block) unlocks it,
    but views taken from it keep it locked until they are collected."""

    def __init__(self, handle):
        self._h = handle
        self._index = None

    def _handle(self):
        if self._h is None:
            raise ValueError("the entry is closed")
        return self._h

    def _info(self, name):
        h = self._handle()
        if self._index is None:
            self._index = {h.info(i)[0]: i for i in range(h.count)}
        try:
            i = self._index[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in entry {h.key!r}") from None
        return i, h.info(i)

    @property
    def key(self):
        return self._handle().key

    def names(self):
        h = self._handle()
        return [h.info(i)[0] for i in range(h.count)]

    @property
    def nbytes(self):
        h = self._handle()
        return sum(h.info(i)[3] for i in range(h.count))

    def __len__(self):
        return self._handle().count

    def numpy(self, name):
        """A numpy array over the tensor's memory: zero-copy, writable."""
        import numpy as np
        i, (_, dtype, shape, nbytes, _, _) = self._info(name)
        buf = self._h.buffer(i)
        return np.frombuffer(buf, dtype=NUMPY_DTYPES[dtype]).reshape(shape)

    def torch(self, name):
        """A torch tensor over the tensor's memory: zero-copy, writable."""
        import torch
        i, (_, dtype, shape, nbytes, _, _) = self._info(name)
        tdtype = next(getattr(torch, n) for n in TORCH_DTYPES[dtype] if hasattr(torch, n))
        buf = self._h.buffer(i)
        if nbytes == 0:  # torch.frombuffer refuses empty buffers
            return torch.empty(shape, dtype=tdtype)
        return torch.frombuffer(buf, dtype=tdtype).reshape(shape)

    def state_dict(self):
        """name -> torch tensor (numpy arrays when torch is absent)."""
        try:
            import torch  # noqa: F401
            view = self.torch
        except ImportError:
            view = self.numpy
        return {name: view(name) for name in self.names()}

    def to_device(self):
        """Move to the GPU. Without keep_ram_copy the host copy goes, but
        not from under live views: it stays (and counts against the RAM
        budget) until they and the entry are gone; new views need
        to_host()."""
        self._handle().to_device()

    def to_host(self):
        self._handle().to_host()

    def close(self):
        self._h = None
        self._index = None

    @property
    def closed(self):
        return self._h is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._h is None:
            return "<tensoralloc.Entry closed>"
        return f"<tensoralloc.Entry {self.key!r}: {len(self)} tensors, {self.nbytes} bytes>"


def _tensor_bytes(value, dtype_override):
    """(safetensors dtype, shape, contiguous bytes-like) of a numpy array
    or torch tensor."""
    if type(value).__module__.startswith("torch"):
        import torch
        t = value.detach().to("cpu").contiguous()
        names = {getattr(torch, n): st for st, ns in TORCH_DTYPES.items() for n in ns[:1]
                 if hasattr(torch, n)}
        if t.dtype not in names:
            raise TypeError(f"no safetensors dtype for torch {t.dtype}")
        dtype = names[t.dtype]
        shape = list(t.shape)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        elif _c.DTYPE_SIZES[dtype] == 1 and t.dtype != torch.bool:
            t = t.view(torch.uint8)
        array = t.numpy()
    else:
        import numpy as np
        shape = list(np.shape(value))  # ascontiguousarray makes 0-d arrays 1-d
        array = np.ascontiguousarray(value)
        by_name = {v: k for k, v in NUMPY_DTYPES.items() if k not in ("BF16", "F8_E4M3", "F8_E5M2")}
        if array.dtype.name not in by_name:
            raise TypeError(f"no safetensors dtype for numpy {array.dtype}")
        dtype = by_name[array.dtype.name]
    if dtype_override is not None:
        if dtype_override not in _c.DTYPE_SIZES:
            raise ValueError(f"unknown safetensors dtype {dtype_override!r}")
        size = _c.DTYPE_SIZES[dtype_override]
        if size != array.dtype.itemsize:
            raise ValueError(f"{dtype_override} has {size}-byte elements, "
                             f"the data {array.dtype.itemsize}-byte ones")
        dtype = dtype_override
    return dtype, shape, memoryview(array.reshape(-1)).cast("B") if array.size else b""


def save_safetensors(path, tensors, metadata=None, dtypes=None):
    """Write a dict of numpy arrays or torch tensors as a safetensors file.
    metadata: str -> str; dtypes: name -> safetensors dtype for data whose
    type numpy cannot name (BF16, F8_E4M3, F8_E5M2 from uint16/uint8)."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps str to str")
    dtypes = dtypes or {}
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"bad tensor name {name!r}")
        items.append((name,) + _tensor_bytes(value, dtypes.get(name)))
    # widest elements first: every tensor starts aligned to its element size
    items.sort(key=lambda it: (-_c.DTYPE_SIZES[it[1]], it[0]))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape, data in items:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, data in items:
            f.write(data)


class MemorySnapshot:
    """Process RAM, the allocator's figures and VRAM at one moment
    (InvokeAI's MemorySnapshot)."""

    _FIELDS = ("process_ram", "large_mapped", "small_used", "small_free", "total_allocated",
               "total_used", "vram")

    def __init__(self, values):
        self._values = tuple(values)
        for name, v in zip(self._FIELDS, self._values):
            setattr(self, name, v)

    @classmethod
    def capture(cls, run_garbage_collector=True):
        if run_garbage_collector:
            import gc
            gc.collect()
        return cls(_c.snapshot())

    def __repr__(self):
        return "MemorySnapshot(" + ", ".join(f"{n}={getattr(self, n)}" for n in self._FIELDS) + ")"


def get_pretty_snapshot_diff(snapshot_1, snapshot_2):
    """One line per metric: "name (+delta): before GB -> after GB"."""
    if snapshot_1 is None or snapshot_2 is None:
        return ""
    return _c.snapshot_diff(snapshot_1._values, snapshot_2._values).rstrip("\n")


def mallinfo2():
    """The allocator's figures in glibc's struct mallinfo2 shape (under the
    preload library: the preloaded allocator's)."""
    return _c.mallinfo2()


def stats():
    """The full ta_stats_t as a dict (the library's own field names)."""
    return _c.stats()


def trim():
    """Give what the allocator retains back to the kernel now (ta_trim)."""
    _c.trim()


def pressure_signal():
    """Respond now as to the kernel's memory-pressure signal
    (ta_pressure_signal): the allocator gives back what it keeps, caches
    evict down to their lowered budget and call their on_pressure."""
    _c.pressure_signal()


def _mapped_files(prefix):
    """Real paths of the files this process maps whose name starts with prefix."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(prefix):
                found.add(os.path.realpath(parts[5].strip()))
    return found


def _beside_library(names):
    """The first of names found in this package's folder (a wheel's, which
    holds the libraries) or the folder of the libtensoralloc.so this package
    loaded (the build folder, an install's libdir), else None."""
    folders = [os.path.dirname(os.path.abspath(__file__))]
    folders += [os.path.dirname(lib) for lib in sorted(_mapped_files("libtensoralloc.so"))]
    for folder in folders:
        for name in names:
            candidate = os.path.join(folder, name)
            if os.path.exists(candidate):
                return candidate
    return None


def preload_path():
    """The path of the preload library that came with this package, for
    LD_PRELOAD (a Dockerfile, a service unit); python -m tensoralloc run
    uses it. Raises FileNotFoundError if it is not beside the library."""
    path = _beside_library(("libtensoralloc-preload.so",))
    if path is None:
        raise FileNotFoundError("libtensoralloc-preload.so is not beside the libtensoralloc.so "
                                "this package loaded (" +
                                (", ".join(sorted(_mapped_files("libtensoralloc.so"))) or "none") + ")")
    return path
