"""`Learner.fit_ddp`, `.ddp`, `.save_ddp_job` and `.load_ddp_result` appear whichever of fastai and mpify_fastai is
imported first, and `ranch`/`in_torchddp` users never import fastai.

If fastai is loaded already, the methods are added at once. Otherwise an import hook watches fastai's modules and
adds them when the outermost fastai import statement has finished (not inside it: fastai's own modules would be
half-initialized), then removes itself.
"""
from __future__ import annotations
import importlib, sys, warnings
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec

__all__ = ['add_learner_methods', 'add_learner_methods_with_fastai']

def add_learner_methods() -> None:
    "Patch fastai's Learner with this package's methods (fastai must be importable)."
    importlib.import_module('mpify_fastai.learner')
    importlib.import_module('mpify_fastai.job')

class _LoaderAfterwards:
    "Wraps a fastai module's loader: runs it, then tells the hook that one more fastai module has finished."
    def __init__(self, loader, hook: '_FastaiImportHook'): self.loader,self.hook = loader,hook
    def __getattr__(self, name): return getattr(self.loader, name)   # get_source, get_resource_reader, ...
    def create_module(self, spec): return self.loader.create_module(spec)
    def exec_module(self, module):
        self.hook.depth += 1
        try: self.loader.exec_module(module)
        finally: self.hook.depth -= 1
        self.hook.finished()

class _FastaiImportHook(MetaPathFinder):
    "Finds nothing itself: wraps the loaders of fastai's modules so it knows when `fastai.learner` is fully imported."
    def __init__(self): self.depth = 0
    def find_spec(self, name: str, path=None, target=None) -> ModuleSpec | None:
        if name != 'fastai' and not name.startswith('fastai.'): return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'): continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'): spec.loader = _LoaderAfterwards(spec.loader, self)
                return spec
        return None
    def finished(self):
        if self.depth or 'fastai.learner' not in sys.modules: return
        if self in sys.meta_path: sys.meta_path.remove(self)
        try: add_learner_methods()
        except Exception as e:   # never break the user's fastai import; only our methods are missing
            warnings.warn(f"mpify_fastai could not add Learner.fit_ddp to this fastai: {type(e).__name__}: {e}")

def add_learner_methods_with_fastai() -> None:
    "Add the Learner methods now if fastai is loaded, else as soon as it is."
    if 'fastai.learner' in sys.modules: add_learner_methods()
    elif not any(isinstance(f, _FastaiImportHook) for f in sys.meta_path): sys.meta_path.insert(0, _FastaiImportHook())
