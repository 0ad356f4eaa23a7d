"""Work that waits for a package: `Learner.fit_ddp`, `.ddp`, `.save_ddp_job` and `.load_ddp_result` appear whichever of
fastai and mpify_fastai is imported first, and the warm server starts as soon as the caller has torch, whatever the
import order; `ranch`/`in_torchddp` users never import fastai.

If the package is loaded already, the action runs at once. Otherwise an import hook watches the package's modules and
runs it when the outermost import statement of the package has finished (not inside it: the package's own modules would
be half-initialized), then removes itself.
"""
from __future__ import annotations
import importlib, sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Callable

__all__ = ['add_learner_methods', 'add_learner_methods_with_fastai', 'when_imported']

def add_learner_methods() -> None:
    "Patch fastai's Learner with this package's methods (fastai must be importable)."
    importlib.import_module('mpify_fastai.learner')
    importlib.import_module('mpify_fastai.job')

class _LoaderAfterwards:
    "Wraps a watched module's loader: runs it, then tells the hook that one more of the package's modules has finished."
    def __init__(self, loader, hook: '_ImportHook'): self.loader,self.hook = loader,hook
    def __getattr__(self, name): return getattr(self.loader, name)   # get_source, get_resource_reader, ...
    def create_module(self, spec): return self.loader.create_module(spec)
    def exec_module(self, module):
        self.hook.depth += 1
        try: self.loader.exec_module(module)
        finally: self.hook.depth -= 1
        self.hook.finished()

class _ImportHook(MetaPathFinder):
    """Finds nothing itself: wraps the loaders of the modules of `packages` to know when `ready` is fully imported and no
    import of theirs is under way, then runs `action`."""
    def __init__(self, packages: tuple[str, ...], ready: str, action: Callable[[], None]):
        self.packages,self.ready,self.action,self.depth = packages,ready,action,0
    def find_spec(self, name: str, path=None, target=None) -> ModuleSpec | None:
        if not any(name == p or name.startswith(p + '.') for p in self.packages): return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'): continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'): spec.loader = _LoaderAfterwards(spec.loader, self)
                return spec
        return None
    def finished(self):
        if self.depth or self.ready not in sys.modules: return
        if self in sys.meta_path: sys.meta_path.remove(self)
        self.action()   # a failure raises from the user's import statement, not as an AttributeError later

def when_imported(package: str, action: Callable[[], None], ready: str | None = None, within: tuple[str, ...] = ()) -> None:
    """Run `action` now if module `ready` (default: `package`) is loaded, else once the import of `package` that loads
    it ends, or the import of a package in `within` that it happened inside (whose modules `action` may import)."""
    ready = ready or package
    if ready in sys.modules: return action()
    if not any(isinstance(f, _ImportHook) and f.packages[0] == package for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook((package, *within), ready, action))

def add_learner_methods_with_fastai() -> None:
    "Add the Learner methods now if fastai is loaded, else as soon as it is."
    when_imported('fastai', add_learner_methods, ready='fastai.learner', within=('mpify_fastai',))
