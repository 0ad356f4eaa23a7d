"""Records every call that would initialise CUDA in this process, from the moment torch is imported.

Import it before torch (first in a fork server's preload, or first thing in a script): it wraps every `torch._C._cuda_*`
function but `HARMLESS` as soon as `torch._C` loads, and `torch.cuda._lazy_init` as soon as `torch.cuda` does. `report()` then tells what was called. Imported where torch already is, it wraps nothing.
"""
from __future__ import annotations
import importlib.abc, importlib.machinery, os, sys, traceback

HARMLESS = {'_cuda_isInBadFork'}   # reads a flag (`torch.cuda.is_initialized()` calls it); touches neither runtime nor driver
CALLS: list[dict] = []

def _recorded(name: str, fn):
    def wrapper(*args, **kwargs):
        CALLS.append(dict(name=name, nvml_check=os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'),
                          stack=''.join(traceback.format_stack(limit=8)[:-1])))
        return fn(*args, **kwargs)
    return wrapper

def _wrap(module) -> None:
    if module.__name__ == 'torch._C':
        for name in dir(module):
            fn = getattr(module, name)
            if name.startswith('_cuda_') and name not in HARMLESS and callable(fn) and not isinstance(fn, type):
                setattr(module, name, _recorded(f'torch._C.{name}', fn))
    else: module._lazy_init = _recorded('torch.cuda._lazy_init', module._lazy_init)

class _Loader(importlib.abc.Loader):
    "The module's own loader, which wraps the module once it has run."
    def __init__(self, loader): self.loader = loader
    def __getattr__(self, name): return getattr(self.loader, name)   # get_source, get_filename, ...
    def create_module(self, spec): return self.loader.create_module(spec)
    def exec_module(self, module):
        self.loader.exec_module(module)
        _wrap(module)

class _Finder(importlib.abc.MetaPathFinder):
    "Hands out torch._C and torch.cuda through `_Loader`, which wraps them once they have loaded."
    def find_spec(self, name, path, target=None):
        if name not in ('torch._C', 'torch.cuda'): return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None: spec.loader = _Loader(spec.loader)
        return spec

if 'torch' not in sys.modules: sys.meta_path.insert(0, _Finder())

def report() -> dict:
    "The calls recorded so far (taken first), then torch's CUDA state here and the NVML-check setting."
    calls = list(CALLS)
    torch = sys.modules.get('torch')
    return dict(calls=calls, ppid=os.getppid(), hooked=any(isinstance(f, _Finder) for f in sys.meta_path), torch=torch is not None,
                initialized=torch.cuda.is_initialized() if torch else None,
                cached_device_count=torch.cuda._cached_device_count if torch else None,
                nvml_check=os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'))

def send_report(conn) -> None:
    "Target of a process forked from the server under test: send `report()` back and close."
    conn.send(report())
    conn.close()
