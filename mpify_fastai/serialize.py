"""Serialization of notebook objects for workers: dill for `__main__` code, a shared-memory file for tensors.

Functions, lambdas and classes defined in `__main__` travel by value; the notebook globals they
reference travel with them and land in the receiver's `__main__`, so code runs there as it ran here.
CPU storages of at least `SHARE_MIN_BYTES` are copied once into a segment file on tmpfs (`/dev/shm`)
that every receiver maps copy-on-write: N workers read one copy, none can change the sender's tensors,
and whoever owns the segment's folder deletes it (no daemon, no leak). CUDA tensors travel as CPU data.
"""
from __future__ import annotations
import io, os, pickle, sys, threading, types
from array import array
from typing import Any
import dill
from dill.detect import globalvars
from .errors import PayloadError

__all__ = ['dumps', 'loads', 'Payload', 'find_unpicklable', 'check_picklable', 'referenced_globals', 'SHARE_MIN_BYTES']

SHARE_MIN_BYTES = 64 * 1024   # smaller storages are cheaper inline than as a region of the segment file
_ALIGN = 64

def _main_dict() -> dict: return sys.modules['__main__'].__dict__

class _Segment:
    "Append-only file that storages are copied into, each at an aligned offset."
    def __init__(self, path: str): self.path,self.f,self.size = path,None,0
    def add(self, storage) -> int:
        import torch
        if self.f is None: self.f = open(self.path, 'wb')
        off = -(-self.size // _ALIGN) * _ALIGN
        if off > self.size: self.f.write(b'\0' * (off - self.size))
        self.f.write(memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy()))
        self.size = off + storage.nbytes()
        return off
    def close(self):
        if self.f is not None: self.f.close()

_loading = threading.local()   # .maps: segment path -> its mapping, while one `loads` runs, so its tensors share one mapping

def _view(st, byte_off: int, dtype, meta: bytes, requires_grad: bool, is_param: bool):
    "A tensor on storage `st` at `byte_off`; `meta` packs its element offset, ndim, shape and strides."
    import torch
    m = array('q'); m.frombytes(meta)
    off, nd = m[0], m[1]
    item = torch.empty(0, dtype=dtype).element_size()
    t = torch.empty(0, dtype=dtype).set_(st, byte_off // item + off, tuple(m[2:2+nd]), tuple(m[2+nd:2+2*nd]))
    return torch.nn.Parameter(t, requires_grad) if is_param else t.requires_grad_(requires_grad)

def _segment_tensor(path: str, byte_off: int, *tail):
    "A tensor on a copy-on-write mapping of the segment file `path` (one mapping per file and process)."
    import torch
    maps = _loading.maps
    st = maps.get(path)
    if st is None: st = maps[path] = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    return _view(st, byte_off, *tail)

def _view_tensor(st, *tail): return _view(st, 0, *tail)

def _storage_from_bytes(b: bytes):
    import torch
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).untyped_storage() if b else torch.UntypedStorage(0)

class _InlineStorage:
    "A CPU storage pickled by value, once however many tensors view it."
    def __init__(self, st): self.st = st
    def __reduce__(self):
        import torch
        return (_storage_from_bytes, (torch.empty(0, dtype=torch.uint8).set_(self.st).numpy().tobytes(),))

def _rebuild_subclass(cls, plain, state):
    "Restore a tensor subclass (fastai's `TensorImage`, ...) around a plain tensor."
    t = plain.as_subclass(cls)
    if state: t.__dict__.update(state)
    return t

def _empty_tensor():
    import torch
    return torch.empty(0)

def _identity(x): return x

class _Pickler(dill.Pickler):
    """dill Pickler: `__main__` functions recorded (their globals get shipped), tensors by `mode`:
    'segment' (large storages into `segment`), 'value' (inline, portable) or 'dry' (empty placeholders)."""
    def __init__(self, file, mode: str = 'segment', segment: _Segment | None = None, main_classes_by_name: bool = False):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL, recurse=False, byref=False)
        self.mode,self.segment,self.main_funcs,self.offsets,self.inline = mode,segment,[],{},{}
        self.by_name = main_classes_by_name
        self.torch,self.main = sys.modules.get('torch'),_main_dict()

    def reducer_override(self, obj):
        t = type(obj)
        if self.by_name and isinstance(obj, type) and obj.__module__ == '__main__' and self.main.get(obj.__qualname__) is obj:
            return obj.__qualname__     # the receiver owns this notebook class: keep `isinstance` working there
        if t is types.FunctionType:
            if obj.__globals__ is self.main: self.main_funcs.append(obj)
            return NotImplemented
        if t in _PLAIN or self.torch is None or not isinstance(obj, self.torch.Tensor): return NotImplemented
        return self._reduce_tensor(obj)

    def _reduce_tensor(self, t):
        torch = self.torch
        if self.mode == 'dry': return (_empty_tensor, ())
        if t.layout != torch.strided or t.is_nested or t.device.type == 'meta' or (t.requires_grad and not t.is_leaf):
            return NotImplemented
        if t.device.type != 'cpu':
            cpu = t.detach().to('cpu')
            return (_identity, (torch.nn.Parameter(cpu, t.requires_grad) if isinstance(t, torch.nn.Parameter) else cpu,))
        if t.is_conj() or t.is_neg():   # lazy conjugate/negated views: their storage holds the values before conj/neg
            r = t.detach().resolve_conj().resolve_neg().requires_grad_(t.requires_grad)
            return (_identity, (torch.nn.Parameter(r, t.requires_grad) if isinstance(t, torch.nn.Parameter) else r,))
        cls = type(t)
        if cls not in (torch.Tensor, torch.nn.Parameter):
            return (_rebuild_subclass, (cls, t.as_subclass(torch.Tensor), dict(getattr(t, '__dict__', {}))))
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        meta = array('q', [t.storage_offset(), t.dim(), *t.shape, *t.stride()]).tobytes()
        tail = (t.dtype, meta, t.requires_grad, cls is torch.nn.Parameter)
        if self.mode == 'segment' and self.segment is not None and st.nbytes() >= SHARE_MIN_BYTES:
            off = self.offsets.get(key)
            if off is None: off = self.offsets[key] = self.segment.add(st)
            return (_segment_tensor, (self.segment.path, off) + tail)
        box = self.inline.get(key)   # one object per storage, so the pickle memo sends its bytes once
        if box is None: box = self.inline[key] = _InlineStorage(st)
        return (_view_tensor, (box,) + tail)

_PLAIN = frozenset([int, float, str, bytes, bool, type(None), tuple, list, dict])

def _referenced_globals(funcs, skip: set) -> dict:
    "Notebook globals that `funcs` reference (through other notebook functions too; modules by name), less `skip`."
    main, out = _main_dict(), {}
    for f in funcs:
        for name in globalvars(f, recurse=True, builtin=False):
            if name not in skip and name in main: out[name] = main[name]
    return out

def referenced_globals(obj: Any, skip=()) -> dict:
    "The notebook globals that `dumps(obj)` would ship with `obj` (name -> value), found by a dry run (for error messages)."
    out, todo = {}, [obj]
    while todo:
        funcs = []
        for o in todo:
            p = _Pickler(io.BytesIO(), mode='dry')
            try: p.dump(o)
            except Exception: pass
            funcs += p.main_funcs
        new = _referenced_globals(funcs, set(skip) | set(out))
        out.update(new)
        todo = list(new.values())
    return out

class Payload:
    "Pickled bytes (one or more pickles sharing a memo) and the segment file holding its large tensors, if any."
    def __init__(self, data: bytes, segment_path: str | None):
        self.data,self.segment_path = data,segment_path
    @property
    def nbytes(self) -> int:
        "Bytes sent: the pickle plus the segment file."
        return len(self.data) + (os.path.getsize(self.segment_path) if self.segment_path else 0)

def dumps(obj: Any, need: dict | None = None, ship_globals: bool = True, mode: str = 'segment',
          segment_path: str | None = None) -> Payload:
    """Pickle `obj`, plus `need` (name -> value) and, with `ship_globals`, the notebook globals its `__main__`
    functions reference; without it (a worker's result going home) `__main__` classes go by name, since the receiver
    has them. Large CPU tensors go to the file `segment_path` (mode 'segment'). Load with `loads`."""
    buf = io.BytesIO()
    seg = _Segment(segment_path) if mode == 'segment' and segment_path and 'torch' in sys.modules else None
    try:
        p = _Pickler(buf, mode=mode, segment=seg, main_classes_by_name=not ship_globals)
        p.dump(obj)
        shipped, todo = set(), dict(need or {})
        while ship_globals or todo:
            if ship_globals: todo.update(_referenced_globals(p.main_funcs, shipped | set(todo)))
            p.main_funcs = []
            if not todo: break
            shipped |= set(todo)
            p.dump(todo)
            todo = {}
    finally:
        if seg is not None: seg.close()
    return Payload(buf.getvalue(), seg.path if seg is not None and seg.f is not None else None)

def loads(data: bytes, install_globals: bool = True) -> Any:
    "Load a `dumps` payload; the globals that came with it go into this process's `__main__` unless `install_globals=False`."
    f = io.BytesIO(data)
    u = dill.Unpickler(f)
    _loading.maps = {}
    try:
        obj = u.load()
        while f.tell() < len(data):
            globs = u.load()
            if install_globals: _main_dict().update(globs)
    finally: _loading.maps = {}
    return obj

def _children(obj) -> list[tuple[str, Any]]:
    if isinstance(obj, dict): return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)): return [(f"[{i}]", v) for i, v in enumerate(obj)]
    out = []
    state = getattr(obj, '__dict__', None)
    if isinstance(state, dict): out += [(f".{k}", v) for k, v in state.items()]
    if isinstance(obj, types.FunctionType) and obj.__closure__:
        out += [(f".<closure {n}>", c.cell_contents) for n, c in zip(obj.__code__.co_freevars, obj.__closure__) if _cell_full(c)]
    return out

def _cell_full(c) -> bool:
    try: c.cell_contents; return True
    except ValueError: return False

def _picklable(obj) -> bool:
    try: _Pickler(io.BytesIO(), mode='dry').dump(obj); return True
    except Exception: return False

def find_unpicklable(obj: Any, path: str = 'obj', _depth: int = 0) -> str | None:
    "Path to the innermost part of `obj` that cannot be pickled, with its type, e.g. `args[1].dls.after_item: <generator>`."
    if _picklable(obj): return None
    if _depth < 40:
        seen = set()
        for sub, child in _children(obj):
            if id(child) in seen: continue
            seen.add(id(child))
            found = find_unpicklable(child, path + sub, _depth + 1)
            if found: return found
    return f"{path}: <{type(obj).__name__}>"

def check_picklable(named: dict[str, Any]) -> None:
    "Raise `PayloadError` naming the first part of `named` (label -> object) that cannot be pickled."
    for label, obj in named.items():
        where = find_unpicklable(obj, label)
        if where:
            raise PayloadError(f"cannot send {where} to the workers: it cannot be pickled. "
                               "Create it inside the worker function instead, or pass what it is made from.")
