# SPDX-License-Identifier: MIT
"""tensoralloc as PyTorch's CPU allocator, in the running process.

    import tensoralloc.torch
    tensoralloc.torch.install()    # CPU tensors made from now on come from tensoralloc
    ...
    tensoralloc.torch.uninstall()  # PyTorch's own allocator again

No LD_PRELOAD: large tensors get a mapping each (back to the kernel on
free), small ones a slab block; Python's own objects stay with the C
library's malloc. Tensors made before a switch keep their deleters, so
either allocator's tensors are freed correctly after a switch in either
direction. The shim (libtensoralloc-torch.so) is C++ against libc10 and
must be built against the torch this process runs: a mismatch is refused
with an error that says so (docs/python.md, "PyTorch").
"""
import ctypes
import errno
import os

import torch as _torch

from . import _beside_library, _mapped_files

__all__ = ["install", "uninstall", "installed", "library_path"]

# The installed soname, and a wheel's unversioned file.
_SHIM_NAMES = ("libtensoralloc-torch.so.0", "libtensoralloc-torch.so")
_lib = None


def library_path():
    """Where the shim is: beside the libtensoralloc.so this package loaded
    (the build folder, the install's libdir, or a wheel's library folder)."""
    return _beside_library(_SHIM_NAMES)


def _torch_abi():
    major_minor = ".".join(_torch.__version__.split("+")[0].split(".")[:2])
    return major_minor, int(bool(_torch._C._GLIBCXX_USE_CXX11_ABI))


def _load():
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if path is None:
        raise RuntimeError("tensoralloc was built without its PyTorch allocator "
                           "(libtensoralloc-torch.so): libtorch's headers and libc10 were not "
                           "found when it was built (Debian: apt-get install libtorch-dev; "
                           "a pip torch: meson setup -Dtorch_dir=...), see docs/python.md")
    running, running_abi = _torch_abi()
    # The shim binds libc10 (and, with the model cache, libtorch_cpu): a
    # file of either that torch had not loaded means another torch.
    c10_before = _mapped_files("libc10.so") | _mapped_files("libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise RuntimeError(f"tensoralloc.torch: cannot load {path} ({e}): it was built against "
                           f"another torch than this process's {_torch.__version__}; rebuild "
                           "tensoralloc against this torch (docs/python.md)") from None
    lib.ta_torch_built_for.restype = ctypes.c_char_p
    built = lib.ta_torch_built_for().decode()
    built_mm = ".".join(built.split(".")[:2])
    built_abi = lib.ta_torch_cxx11_abi()
    c10_after = _mapped_files("libc10.so") | _mapped_files("libtorch_cpu.so")
    if built_mm != running or built_abi != running_abi or c10_after != c10_before:
        raise RuntimeError(f"tensoralloc.torch: the shim was built against libtorch {built} "
                           f"(C++11 ABI {built_abi}, libraries {sorted(c10_after - c10_before)}) "
                           f"but this process runs torch {_torch.__version__} (C++11 ABI "
                           f"{running_abi}, libraries {sorted(c10_before)}); rebuild tensoralloc "
                           "against this torch (docs/python.md)")
    _lib = lib
    return lib


def install():
    """Makes tensoralloc PyTorch's CPU allocator. Idempotent."""
    rc = _load().ta_torch_install()
    if rc == errno.EBUSY:
        raise RuntimeError("tensoralloc.torch.install: PyTorch keeps another CPU allocator "
                           "(one set with a higher priority)")
    if rc != 0:
        raise OSError(rc, os.strerror(rc))


def uninstall():
    """Puts back the allocator that was in force before install()."""
    rc = _load().ta_torch_uninstall()
    if rc == errno.EINVAL:
        raise RuntimeError("tensoralloc.torch.uninstall: not installed")
    if rc == errno.EBUSY:
        raise RuntimeError("tensoralloc.torch.uninstall: another CPU allocator was installed "
                           "over tensoralloc's since; it stays in force")
    if rc != 0:
        raise OSError(rc, os.strerror(rc))


def installed():
    """True while tensoralloc is PyTorch's CPU allocator."""
    return _lib is not None and bool(_lib.ta_torch_installed())
