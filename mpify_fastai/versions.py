"""The Python, torch and fastai this package supports, checked on import, and the one place where those versions differ.

The range is where users are (Kaggle and Colab images, year-old conda environments, cluster modules) and exactly what CI
runs at both ends: Python 3.10 with fastai 2.7.19 and torch 2.6.0, Python 3.11 and 3.13 with fastai 2.8.12 and torch 2.14.1.
`settings.ini` declares the same bounds. Read from package metadata: importing this imports neither torch nor fastai.
"""
from __future__ import annotations
import os, re, sys, warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

__all__ = ['SUPPORTED', 'UnsupportedVersionError', 'installed_version', 'unsupported', 'check_supported', 'add_method']

# name -> (lowest supported, first unsupported); the tested ends are the lowest and the newest release below the bound
SUPPORTED = {'python': ((3, 10), (3, 14)), 'torch': ((2, 6), (2, 15)), 'fastai': ((2, 7, 19), (2, 9))}
ALLOW_UNTESTED = 'MPIFY_ALLOW_UNTESTED'   # set to 1 to import anyway outside the range (a warning instead of the error)

class UnsupportedVersionError(ImportError):
    "Python, torch or fastai is outside the range this package is tested on; the message names each and the range."

def _parsed(v: str) -> tuple[int, ...]:
    "'2.6.0+cu124' -> (2, 6, 0); '2.15.0rc1' -> (2, 15, 0)."
    return tuple(int(m) for m in re.findall(r'\d+', v.split('+')[0])[:3])

def _shown(t: tuple[int, ...]) -> str: return '.'.join(map(str, t))

def installed_version(name: str) -> str | None:
    "The installed version of distribution `name` ('python' is this interpreter), or None if it is not installed."
    if name == 'python': return '.'.join(map(str, sys.version_info[:3]))
    try: return version(name)
    except PackageNotFoundError: return None

def unsupported() -> list[str]:
    "One line for each of Python, torch and fastai that is installed outside `SUPPORTED`."
    out = []
    for name, (low, high) in SUPPORTED.items():
        v = installed_version(name)
        if v is not None and not low <= _parsed(v) < high:
            out.append(f"{name} {v} (supported: >= {_shown(low)}, < {_shown(high)})")
    return out

def check_supported() -> None:
    "Raise `UnsupportedVersionError` naming what is outside the range, unless MPIFY_ALLOW_UNTESTED=1 makes it a warning."
    bad = unsupported()
    if not bad: return
    msg = (f"mpify_fastai {_own_version()} is tested with Python 3.10-3.13, torch 2.6-2.14 and fastai 2.7.19-2.8, and this "
           f"environment has {'; '.join(bad)}. Install a supported version (e.g. pip install 'fastai>=2.7.19,<2.9' "
           f"'torch>=2.6,<2.15'), or set {ALLOW_UNTESTED}=1 to try it untested")
    if os.environ.get(ALLOW_UNTESTED) == '1': warnings.warn(msg.replace(f", or set {ALLOW_UNTESTED}=1 to try it untested", ''), stacklevel=3)
    else: raise UnsupportedVersionError(msg)

def _own_version() -> str:
    from . import __version__
    return __version__

# ---------------------------------------------------------------- where the supported versions differ

def add_method(cls: type, name: str, fn: Callable) -> None:
    """`cls.<name> = fn`, named as a method of `cls` (for help() and tracebacks). fastcore's `patch_to(cls, nm=name)` does
    this from fastcore 1.8 (fastai 2.8) on; fastcore 1.7 (fastai 2.7) has no `nm=`."""
    fn.__name__, fn.__qualname__ = name, f'{cls.__name__}.{name}'
    setattr(cls, name, fn)
