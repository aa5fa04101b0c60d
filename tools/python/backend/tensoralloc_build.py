# SPDX-License-Identifier: MIT
"""The build backend of pyproject.toml: meson-python's, less one request.

meson-python 0.12 (Debian 12's python3-mesonpy) asks for patchelf for
every project with compiled code when patchelf is not on PATH, so that
`python3 -m build --no-isolation` stops with "Missing dependencies:
patchelf" on a machine without it (Debian 12 has no patchelf package
either way). It uses patchelf only to give run paths to libraries a
project installs into libdir; with -Dwheel=true this project installs
nothing there (meson.build: the libraries go into the package folder,
found by $ORIGIN), so the request is dropped here. Were a library to
land in libdir after all, meson-python would still fail loudly when it
looked for patchelf.
"""
import mesonpy
from mesonpy import build_sdist, build_wheel, get_requires_for_build_sdist  # noqa: F401

try:  # PEP 660 editable installs, where this meson-python has them
    from mesonpy import build_editable, get_requires_for_build_editable  # noqa: F401
except ImportError:
    pass


def get_requires_for_build_wheel(config_settings=None):
    return [r for r in mesonpy.get_requires_for_build_wheel(config_settings)
            if not r.replace(" ", "").startswith("patchelf")]
