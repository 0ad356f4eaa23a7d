"""Import statements for workers: parsed with `ast` in the caller, executed in each worker's `__main__`."""
from __future__ import annotations
import ast, importlib
from typing import Iterable
from .errors import UsageError

__all__ = ['ImportsError', 'parse_imports', 'run_imports', 'global_imports', 'import_star']

class ImportsError(UsageError, ValueError):
    "`imports=` text that is not a sequence of import statements."

def parse_imports(src: str) -> ast.Module:
    "Parse `src`, accepting only `import` / `from ... import` statements (comments and blank lines allowed)."
    if not isinstance(src, str): raise ImportsError(f"imports must be a string of import statements, got {type(src).__name__}")
    try: tree = ast.parse(src, filename='<imports>')
    except SyntaxError as e: raise ImportsError(f"imports has a syntax error on line {e.lineno}: {e.msg}") from None
    for node in tree.body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            line = ast.get_source_segment(src, node) or type(node).__name__
            raise ImportsError(f"imports may hold only import statements; line {node.lineno} is not one: {line.splitlines()[0]!r}")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ImportsError(f"imports line {node.lineno}: relative imports have no package to resolve in a worker")
    return tree

def run_imports(src: str, ns: dict) -> dict:
    "Execute the import statements of `src` into namespace `ns` (a worker's `__main__.__dict__`); returns `ns`."
    tree = parse_imports(src)
    if tree.body: exec(compile(tree, '<imports>', 'exec'), ns)
    return ns

def global_imports(imports: str | Iterable[str], ns: dict | None = None) -> dict:
    """mpify's `global_imports`: run import statements (a string, or a list of lines as mpify takes) into `ns`
    (default: this process's `__main__`); only import statements are accepted."""
    import sys
    src = imports if isinstance(imports, str) else '\n'.join(imports)
    return run_imports(src, sys.modules['__main__'].__dict__ if ns is None else ns)

def _public_names(mod) -> list[str]:
    names = getattr(mod, '__all__', None)
    return list(names) if names is not None else [n for n in vars(mod) if not n.startswith('_')]

def import_star(modules: str | Iterable[str], ns: dict | None = None) -> dict:
    """Do `from m import *` for each module name in `modules` into `ns`, usable inside functions. The default namespace is
    the caller's globals: for a notebook function that is `__main__`, as in mpify; a module's function sees them too."""
    if ns is None:
        import sys
        ns = sys._getframe(1).f_globals
    if isinstance(modules, str): modules = modules.replace(',', ' ').split()
    for name in modules:
        mod = importlib.import_module(name)
        ns.update({n: getattr(mod, n) for n in _public_names(mod)})
    return ns
