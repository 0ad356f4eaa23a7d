"""Serialization of notebook objects for workers: the C pickler for data, notebook code by value, big buffers out of band.

Everything goes through the C `pickle.Pickler` (protocol 5); its `reducer_override` adds what plain pickle lacks.
Functions that cannot be imported by name (notebook code, lambdas, closures) travel by value, and so do classes
defined in `__main__` (through dill: the one thing it is needed for). The notebook globals that shipped code references
travel too and land in the receiver's `__main__`, so code runs there as it ran here. Large buffers never enter the
pickle stream: numpy arrays (pandas blocks included) as protocol-5 out-of-band buffers, and torch storages cut to the
bytes their tensors view, go once into a segment file on tmpfs (`/dev/shm`) that receivers map copy-on-write, region by
region: N workers share one physical copy, none can change the sender's data, and what comes back holds its own bytes
only. Whoever owns the segment's folder deletes it. CUDA tensors travel as CPU data.
"""
from __future__ import annotations
import copyreg, dis, functools, importlib, inspect, io, marshal, mmap, os, pickle, sys, threading, types
from array import array
from bisect import bisect_right
from typing import Any, Callable
import dill
from ._private import LRU_CACHE_INFO, LRU_CACHE_WRAPPER, numpy_frombuffer
from .errors import PayloadError
from .files import AnonymousFile

__all__ = ['dumps', 'loads', 'Payload', 'find_unpicklable', 'check_picklable', 'check_call', 'referenced_globals',
           'SHARE_MIN_BYTES']

SHARE_MIN_BYTES = 64 * 1024   # smaller buffers are cheaper in the pickle stream than as a region of the segment file
_ARRAY_LIST_MIN = 4096        # a list of at least this many numpy numbers of one type in an object travels as one array
_ALIGN = 64                   # a region starts at a multiple of this in its storage, so every view's offset divides
_MAIN_NAMES = ('__main__', '__mp_main__')   # a worker re-importing a script runs it as __mp_main__
_ATOMS = frozenset([int, float, complex, str, bytes, bool, type(None)])
_HEADER = 'mpify payload 1'   # first item of a payload's header pickle
_GLOBAL_OPS = frozenset(['LOAD_GLOBAL', 'STORE_GLOBAL', 'DELETE_GLOBAL', 'LOAD_NAME', 'LOAD_FROM_DICT_OR_GLOBALS'])
_FUNCTION_ATTRS = ('__defaults__', '__kwdefaults__', '__qualname__', '__module__', '__doc__', '__annotations__')

def _main_dict() -> dict: return sys.modules['__main__'].__dict__

def _main_attr(qualname: str) -> Any: return functools.reduce(getattr, qualname.split('.'), sys.modules['__main__'])

def _importable(obj) -> bool:
    "`obj` (a function or class) is what its module and qualified name lead to: pickle can send it by reference."
    mod = None if obj.__module__ in _MAIN_NAMES else sys.modules.get(obj.__module__)
    try: return mod is not None and functools.reduce(getattr, obj.__qualname__.split('.'), mod) is obj
    except AttributeError: return False

class _Call:
    """Unpickles as `fn(*args)`, given `state` as pickle gives it: a stand-in for what the receiver has (its `__main__`
    dict) or makes, built from the standard library."""
    def __init__(self, fn: Callable, *args, state=None): self.fn,self.args,self.state = fn,args,state
    def __reduce__(self): return (self.fn, self.args, self.state)
    def __call__(self, *args, **kwargs): return self.fn(*self.args)(*args, **kwargs)   # pickle checks reducers are callable

_FUNCTION, _CELL, _METHOD = (_Call(getattr, types, t) for t in ('FunctionType', 'CellType', 'MethodType'))

def _global_names(code) -> set[str]:
    "Names that `code`, and the code nested in it (inner functions, comprehensions, class bodies), looks up as globals."
    out = {i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_OPS}
    for c in code.co_consts:
        if isinstance(c, types.CodeType): out |= _global_names(c)
    return out

# ---------------------------------------------------------------- reductions: code by value, numpy, classes through dill

# reductions take (pickler, object); a pickler keeps them by type, unbound, so that it holds no reference cycle (a cycle
# would keep everything its memo holds, such as the optimizer state a fit_ddp call sent, alive until the next gc)

def _reduce_cell(_, c):
    "A cell is made empty and filled afterwards, so a function whose closure holds itself comes out right."
    try: return (_CELL, (), (None, {'cell_contents': c.cell_contents}))
    except ValueError: return (_CELL, ())

def _reduce_code(_, code): return (marshal.loads, (marshal.dumps(code),))

def _reduce_module(_, m): return (importlib.import_module, (m.__name__,))

def _reduce_lru_cache(_, f):
    "A `functools.lru_cache` of a notebook function: pickle's own sends it by a name that the receiver may not have yet."
    if _importable(f): return NotImplemented
    ps = f.cache_parameters()
    return (LRU_CACHE_WRAPPER, (f.__wrapped__, ps['maxsize'], ps['typed'], LRU_CACHE_INFO), dict(f.__dict__))

_REDUCERS = {types.CellType: _reduce_cell, types.CodeType: _reduce_code, types.ModuleType: _reduce_module,
             LRU_CACHE_WRAPPER: _reduce_lru_cache}

def _reduce_array(_, a):
    """A numpy array's bytes as one protocol-5 buffer, whatever its layout or dtype (numpy's own keeps non-contiguous and
    datetime arrays in the stream), rebuilt by numpy's own `_frombuffer`."""
    import numpy as np
    if a.dtype.hasobject or a.itemsize == 0: return NotImplemented
    order = 'F' if a.ndim > 1 and not a.flags.c_contiguous and a.flags.f_contiguous else 'C'
    c = a.T if order == 'F' else a if a.flags.c_contiguous else a.copy()
    return (numpy_frombuffer(), (pickle.PickleBuffer(c.reshape(-1).view(np.uint8)), a.dtype, a.shape, order))

class _ClassPickler(dill.Pickler):
    """dill for one class by value. What the C pickler carries (functions, other classes, big buffers, files to refuse)
    is left to it: such objects become references into `refs`, which the C pickler sends alongside. Builtin types
    (`mappingproxy`, ...) stay with dill, which knows them."""
    def __init__(self, file, cls: type, by_c: tuple):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL, recurse=False, byref=False)
        self.cls,self.by_c,self.refs = cls,by_c,[]
    def persistent_id(self, obj):
        if obj is self.cls or not isinstance(obj, self.by_c) or getattr(obj, '__module__', None) == 'builtins': return None
        self.refs.append(obj)
        return len(self.refs) - 1

def _numpy_number_type(items: list) -> type | None:
    "The one numpy number type of every item of `items` (fastai keeps a loader's epoch indices so), or None."
    np = sys.modules.get('numpy')
    t = type(items[0])
    if np is None or t.__module__ != 'numpy' or not issubclass(t, (np.integer, np.floating, np.complexfloating, np.bool_)):
        return None
    return t if len(set(map(type, items))) == 1 else None

def _refcounts(d: dict) -> dict: return {k: sys.getrefcount(v) for k, v in d.items()}

_HELD_ONCE = _refcounts({'': []})['']   # what `_refcounts` says of a value that its dict alone holds

class _ArrayList:
    "A list of numpy numbers of one type, sent as one array (one buffer, not a reduction per item): it arrives as it was."
    def __init__(self, items: list, t: type): self.items,self.t = items,t
    def __reduce__(self):
        import numpy as np
        return (list, (np.array(self.items, dtype=self.t),))

# ---------------------------------------------------------------- tensors

class _Slot:
    "A sender's storage and the byte spans its tensors view; pickled as its index, its regions are written after the dump."
    def __init__(self, index: int, storage): self.index,self.storage,self.spans = index,storage,[]
    def __reduce__(self): return (_slot_regions, (self.index,))

def _merged(spans: list) -> list:
    "Sorted spans, those that overlap or nearly touch (gap under `SHARE_MIN_BYTES`) joined."
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + SHARE_MIN_BYTES: out[-1][1] = max(out[-1][1], b)
        else: out.append([a, b])
    return out

def _empty_tensor():
    import torch
    return torch.empty(0)

def _identity(x): return x

def _rebuild_subclass(cls, plain, state):
    "Restore a tensor subclass (fastai's `TensorImage`, ...) around a plain tensor."
    t = plain.as_subclass(cls)
    if state: t.__dict__.update(state)
    return t

_loading = threading.local()   # .state: the `_Loading` of the `loads` running in this thread

class _Loading:
    "The segment regions of one payload being loaded, each mapped copy-on-write on its own, so each can be freed on its own."
    def __init__(self, path: str | None, buffers: list, slots: list):
        self.path,self.bufs,self.slots,self.fd = path,buffers,slots,None
    def map(self, off: int, n: int) -> mmap.mmap:
        if self.fd is None: self.fd = os.open(self.path, os.O_RDONLY)
        return mmap.mmap(self.fd, n, offset=off, access=mmap.ACCESS_COPY)
    def buffers(self): return (self.map(off, n) for off, n in self.bufs)
    def close(self):
        if self.fd is not None: os.close(self.fd)

def _slot_regions(index: int) -> list:
    "The storages of slot `index` of the payload being loaded: (start byte in the sender's storage, storage), by start."
    import torch
    state = _loading.state
    def storage(data): return torch.frombuffer(bytearray(data) if isinstance(data, bytes) else state.map(*data),
                                               dtype=torch.uint8).untyped_storage()
    return [(start, storage(data)) for start, data in state.slots[index]]

def _tensor(regions: list, start: int, dtype, meta: bytes, requires_grad: bool, is_param: bool):
    "A tensor whose first element is byte `start` of the sender's storage, on the region of `regions` that holds it."
    import torch
    m = array('q'); m.frombytes(meta)
    shape, stride = tuple(m[1:1 + m[0]]), tuple(m[1 + m[0]:])
    if 0 in shape: t = torch.empty_strided(shape, stride, dtype=dtype)
    else:
        r0, st = regions[bisect_right(regions, start, key=lambda r: r[0]) - 1]
        t = torch.empty(0, dtype=dtype).set_(st, (start - r0) // dtype.itemsize, shape, stride)
    return torch.nn.Parameter(t, requires_grad) if is_param else t.requires_grad_(requires_grad)

# ---------------------------------------------------------------- the pickler

class _Segment:
    """Buffers appended to a file with no name in `folder`, made at the first one, each at a page-aligned offset so that
    a receiver can map it on its own. Its bytes live while the segment, or a receiver that mapped them, holds them."""
    def __init__(self, folder: str): self.folder,self.file,self.size = folder,None,0
    def add(self, buf: memoryview) -> int:
        if self.file is None: self.file = AnonymousFile(self.folder)
        off = -(-self.size // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        self.file.write(buf, off)
        self.size = off + buf.nbytes
        return off
    @property
    def path(self) -> str | None: return None if self.file is None else self.file.path
    def close(self):
        if self.file is not None: self.file.close()

class _OutOfBand:
    "The protocol-5 buffer callback: large buffers (numpy arrays' bytes) go into `segment`, out of the stream ('dry': nowhere)."
    def __init__(self, mode: str, segment: _Segment | None): self.mode,self.segment,self.at = mode,segment,[]
    def __call__(self, buf: pickle.PickleBuffer) -> bool:
        if self.mode == 'dry': return False
        m = buf.raw()
        if self.segment is None or m.nbytes < SHARE_MIN_BYTES: return True
        self.at.append((self.segment.add(m), m.nbytes))
        return False

_UNSEEN = object()

class _Pickler(pickle.Pickler):
    """The C pickler, protocol 5, plus: functions that cannot be imported by name by value, `__main__` classes by value
    (or by name with `classes_by_name`, for results going home), modules by name, numpy scalars compactly; tensors and
    numpy buffers by `mode`: 'segment' (large ones into `segment`), 'value' (in the stream) or 'dry' (dropped)."""
    def __init__(self, file, mode: str = 'segment', segment: _Segment | None = None, classes_by_name: bool = False):
        self.oob = _OutOfBand(mode, segment)
        super().__init__(file, protocol=5, buffer_callback=self.oob)
        self.mode,self.segment,self.by_name = mode,segment,classes_by_name
        self.main_funcs,self.main_classes,self.slots,self.how,self.layouts,self.packages = [],{},{},{},{},set()
        self.torch,self.main = sys.modules.get('torch'),_main_dict()

    def reducer_override(self, obj):
        t = type(obj)
        how = self.how.get(t, _UNSEEN)
        if how is _UNSEEN: how = self.how[t] = self._how(t)
        if how is None: return NotImplemented
        return (t, (how(obj),)) if type(how) is type else how(self, obj)

    def _how(self, t: type) -> Callable | None:
        """The reduction for objects of type `t`, or None where pickle's own is right (decided once per type). For numpy
        scalars, the Python type they convert to: 3x faster than numpy's own reduction (fastai keeps lists of them)."""
        if t is types.FunctionType: return _Pickler._function
        if t is types.MethodType: return _Pickler._method
        if issubclass(t, type): return _Pickler._class
        if t in _REDUCERS: return _REDUCERS[t]
        if self.torch is not None and issubclass(t, self.torch.Tensor): return _Pickler._tensor
        np = sys.modules.get('numpy')
        if np is not None and t in (np.ndarray, np.memmap): return _reduce_array
        if np is not None and t.__module__ == 'numpy':
            for kinds, py in (((np.integer,), int), ((np.bool_,), bool), ((np.float16, np.float32, np.float64), float),
                              ((np.complex64, np.complex128), complex)):
                if issubclass(t, kinds): return py
        if (t.__reduce_ex__ is object.__reduce_ex__ and t.__reduce__ is object.__reduce__ and t not in copyreg.dispatch_table
                and np is not None):
            return _Pickler._object
        return None

    def _object(self, obj):
        """An object reduced as pickle's own would, but a long list of numpy numbers that its `__dict__` alone holds (the
        epoch indices a fastai loader keeps: 1.6M at 2M rows) goes as one array. Held nowhere else, it cannot lose an identity."""
        rv = obj.__reduce_ex__(5)
        state = rv[2] if len(rv) > 2 else None
        if type(state) is not dict or state is not getattr(obj, '__dict__', None): return rv
        refs = _refcounts(state)
        lists = {k: t for k, v in state.items() if type(v) is list and len(v) >= _ARRAY_LIST_MIN and refs[k] == _HELD_ONCE
                 and (t := _numpy_number_type(v)) is not None}
        if not lists: return rv
        return (*rv[:2], {k: _ArrayList(v, lists[k]) if k in lists else v for k, v in state.items()}, *rv[3:])

    def _function(self, f):
        self.packages.add(f.__module__.partition('.')[0] if isinstance(f.__module__, str) else '')
        if f.__globals__ is self.main: self.main_funcs.append(f)
        elif _importable(f): return NotImplemented
        g, mod = f.__globals__, sys.modules.get(f.__globals__.get('__name__'))
        globs = (_Call(vars, sys.modules['__main__']) if g is self.main else _Call(vars, mod)
                 if mod is not None and mod.__name__ not in _MAIN_NAMES and vars(mod) is g
                 else {k: g[k] for k in _global_names(f.__code__) if k in g})
        return (_FUNCTION, (f.__code__, globs, f.__name__, None, f.__closure__),
                (f.__dict__ or None, {k: getattr(f, k) for k in _FUNCTION_ATTRS}))

    def _method(self, m):
        """A bound method by name where its object has it under that name, else as function + object: fastai's
        `Callback(before_fit=lambda self: ...)` binds a lambda that no attribute name finds."""
        if getattr(m.__self__, m.__func__.__name__, None) == m: return NotImplemented
        return (_METHOD, (m.__func__, m.__self__))

    def _class(self, cls: type):
        self.packages.add(cls.__module__.partition('.')[0])
        if self.by_name and cls.__module__ in _MAIN_NAMES:
            try:
                if _main_attr(cls.__qualname__) is cls: return (_main_attr, (cls.__qualname__,))   # keeps `isinstance` working
            except AttributeError: pass
        if cls.__module__ == 'builtins' or _importable(cls): return NotImplemented
        if not self.by_name and cls.__module__ in _MAIN_NAMES and self.main.get(cls.__qualname__) is cls:
            self.main_classes[cls.__qualname__] = cls   # it joins the receiver's `__main__`: results come home by name
        by_c = (types.FunctionType, type, io.IOBase) + tuple(getattr(sys.modules.get(m), n) for m, n in
                                                             (('torch', 'Tensor'), ('numpy', 'ndarray')) if m in sys.modules)
        p = _ClassPickler(f := io.BytesIO(), cls, by_c)
        p.dump(cls)   # the receiver reads it with dill's Unpickler, its references resolved from `refs`
        reader = _Call(dill.Unpickler, _Call(io.BytesIO, f.getvalue()),
                       state=(None, {'persistent_load': tuple(p.refs).__getitem__}))
        return (_Call(getattr, reader, 'load'), ())

    def _tensor(self, t):
        torch = self.torch
        self.packages.add('torch')
        if self.mode == 'dry': return (_empty_tensor, ())
        if t.layout != torch.strided or t.is_nested or t.device.type == 'meta' or (t.requires_grad and not t.is_leaf):
            return NotImplemented
        if t.device.type != 'cpu' or t.is_conj() or t.is_neg():   # CUDA as CPU data; lazy conj/neg views as their values
            r = t.detach().to('cpu').resolve_conj().resolve_neg()
            is_param = isinstance(t, torch.nn.Parameter)
            return (_identity, (torch.nn.Parameter(r, t.requires_grad) if is_param else r.requires_grad_(t.requires_grad),))
        cls = type(t)
        if cls not in (torch.Tensor, torch.nn.Parameter):
            return (_rebuild_subclass, (cls, t.as_subclass(torch.Tensor), dict(getattr(t, '__dict__', {}))))
        st = t.untyped_storage()
        slot = self.slots.get(key := (st.data_ptr(), st.nbytes()))
        if slot is None: slot = self.slots[key] = _Slot(len(self.slots), st)
        size = t.element_size()
        start = t.storage_offset() * size
        layout = self.layouts.get(lkey := (t.shape, t.stride(), size))
        if layout is None:
            shape, stride = lkey[:2]
            extent = size * (1 + sum((n - 1) * s for n, s in zip(shape, stride))) if all(shape) else 0
            layout = self.layouts[lkey] = (extent, array('q', [len(shape), *shape, *stride]).tobytes())
        if layout[0]: slot.spans.append((start, start + layout[0]))
        return (_tensor, (slot, start, t.dtype, layout[1], t.requires_grad, cls is torch.nn.Parameter))

    def regions(self) -> list:
        "Write each slot's viewed bytes as merged regions: (start, bytes) in the stream, or (start, (offset, nbytes)) in the segment."
        out = []
        for s in self.slots.values():
            mem = self.torch.empty(0, dtype=self.torch.uint8).set_(s.storage).numpy()
            regs = []
            for a, b in _merged(s.spans):
                part = mem[a - a % _ALIGN:b]
                big = self.segment is not None and part.nbytes >= SHARE_MIN_BYTES
                regs.append((a - a % _ALIGN, (self.segment.add(memoryview(part)), part.nbytes) if big else part.tobytes()))
            out.append(regs)
        return out

# ---------------------------------------------------------------- dumps and loads

def _referenced_globals(funcs, skip: set) -> dict:
    "Notebook globals that `funcs` name, less `skip`; the notebook functions among them are followed by the next dump."
    main = _main_dict()
    return {k: main[k] for f in funcs for k in _global_names(f.__code__) if k not in skip and k in main}

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
    """Pickled bytes (a header, then one or more pickles sharing a memo), the segment file holding its large buffers, if
    any, and the top-level packages whose classes, functions or tensors it holds (a receiver must import them).
    The segment has no name: receivers load `data` while this payload is open, and `close()` (or its end) frees it."""
    def __init__(self, data: bytes, segment: _Segment | None = None, packages: frozenset[str] = frozenset()):
        self.data,self.segment,self.packages = data,segment,packages
    @property
    def segment_path(self) -> str | None:
        "Where a receiver opens the segment, while this payload is open; None when nothing went out of the stream."
        return None if self.segment is None else self.segment.path
    def close(self) -> None:
        if self.segment is not None: self.segment.close()
    @property
    def needs_torch(self) -> bool:
        "Whether loading it imports torch (tensors, or torch's or fastai's objects)."
        return bool({'torch', 'fastai', 'torchvision'} & self.packages)
    @property
    def nbytes(self) -> int:
        "Bytes sent: the pickle plus the segment file."
        return len(self.data) + (self.segment.size if self.segment is not None else 0)

def dumps(obj: Any, need: dict | None = None, ship_globals: bool = True, mode: str = 'segment',
          segment_dir: str | None = None) -> Payload:
    """Pickle `obj`, plus `need` (name -> value) and, with `ship_globals`, the notebook globals its `__main__`
    functions reference; without it (a worker's result going home) `__main__` classes go by name, since the receiver
    has them. Large numpy buffers and tensor storages go to a file with no name in `segment_dir` (mode 'segment'), which
    lives as long as the payload (or a receiver's mapping of it). Load with `loads`."""
    body = io.BytesIO()
    seg = _Segment(segment_dir) if mode == 'segment' and segment_dir else None
    try:
        p = _Pickler(body, mode=mode, segment=seg, classes_by_name=not ship_globals)
        p.dump(obj)
        shipped, todo = set(), dict(need or {})
        while ship_globals or todo:
            if ship_globals:
                todo.update(_referenced_globals(p.main_funcs, shipped | set(todo)))
                todo.update({k: c for k, c in p.main_classes.items() if k not in shipped})
            p.main_funcs, p.main_classes = [], {}
            if not todo: break
            shipped |= set(todo)
            p.dump(todo)
            todo = {}
        regions = p.regions()
    except BaseException:
        if seg is not None: seg.close()
        raise
    if seg is not None and seg.file is None: seg = None
    return Payload(b''.join([pickle.dumps((_HEADER, seg.path if seg else None, p.oob.at, regions), protocol=5), body.getbuffer()]),
                   seg, frozenset(p.packages - {''}))

def loads(data: bytes, install_globals: bool = True) -> Any:
    """Load a `dumps` payload (a plain pickle loads as such); the globals that came with it go into this process's
    `__main__` unless `install_globals=False`."""
    f = io.BytesIO(data)
    head = pickle.load(f)
    if not (isinstance(head, tuple) and head[:1] == (_HEADER,)): return head
    state, outer = _Loading(*head[1:]), getattr(_loading, 'state', None)
    _loading.state = state
    try:
        u = pickle.Unpickler(f, buffers=state.buffers())
        obj = u.load()
        while f.tell() < len(data):
            globs = u.load()
            if install_globals: _main_dict().update(globs)
    finally:
        state.close()
        _loading.state = outer
    return obj

# ---------------------------------------------------------------- naming what cannot be pickled

class _Probe(_Pickler):
    "A dry pickler that remembers the last object it was asked to reduce: where a failing dump stopped."
    last = None
    def reducer_override(self, obj):
        self.last = obj
        return super().reducer_override(obj)

class _Shallow(_Pickler):
    "A dry pickler that reduces its root only: everything the root refers to goes as a reference."
    def __init__(self, root): super().__init__(io.BytesIO(), mode='dry'); self.root = root
    def persistent_id(self, obj): return None if obj is self.root else 0

def _fails_alone(obj) -> bool:
    try: _Shallow(obj).dump(obj); return False
    except Exception: return True

def _is_leaf(o) -> bool:
    "Pickled whole: classes and modules (by name or through dill), tensors and numpy buffers."
    if isinstance(o, (type, types.ModuleType)): return True
    torch, np = sys.modules.get('torch'), sys.modules.get('numpy')
    return ((torch is not None and isinstance(o, torch.Tensor))
            or (np is not None and isinstance(o, np.ndarray) and not o.dtype.hasobject))

def _cell_full(c) -> bool:
    try: c.cell_contents; return True
    except ValueError: return False

def _children(o) -> list[tuple[str, Any]]:
    "What pickling `o` goes on to pickle, each with the label that names it after `o`'s path."
    if isinstance(o, dict): return [(f"[{k!r}]", v) for k, v in o.items()]
    if isinstance(o, (list, tuple)): return [(f"[{i}]", v) for i, v in enumerate(o)]
    if isinstance(o, (set, frozenset)): return [(f"{{{i}}}", v) for i, v in enumerate(o)]
    if isinstance(o, types.FunctionType):
        cells = zip(o.__code__.co_freevars, o.__closure__ or ())
        return ([(f".<closure {n}>", c.cell_contents) for n, c in cells if _cell_full(c)]
                + [(f".__defaults__[{i}]", v) for i, v in enumerate(o.__defaults__ or ())]
                + [(f".__kwdefaults__[{k!r}]", v) for k, v in (o.__kwdefaults__ or {}).items()]
                + [(f".{k}", v) for k, v in o.__dict__.items()])
    if _is_leaf(o): return []
    coll = getattr(sys.modules.get('fastcore.foundation'), 'CollBase', None)
    if coll is not None and isinstance(o, coll): return [(f"[{i}]", v) for i, v in enumerate(o.items)]   # fastai's `L`
    try: rv = o.__reduce_ex__(5)
    except Exception: return []
    if not isinstance(rv, tuple): return []
    args, state, items, pairs = (tuple(rv[1:5]) + (None,) * 4)[:4]
    out = [('.__class__' if a is type(o) else f'<arg {i}>', a) for i, a in enumerate(args or ())]
    for d in state if isinstance(state, tuple) and len(state) == 2 else (state,):
        if isinstance(d, dict): out += [(f".{k}", v) for k, v in d.items()]
        elif d is not None: out.append(('<state>', d))
    return out + [(f"[{i}]", v) for i, v in enumerate(items or ())] + [(f"[{k!r}]", v) for k, v in (pairs or ())]

def _path_to(named: dict[str, Any], target) -> str | None:
    "The shortest path from a label of `named` to `target`, along what pickling follows (breadth first, each object once)."
    seen, level = {}, list(named.items())
    while level:
        nxt = []
        for path, o in level:
            if o is target: return path
            if id(o) in seen: continue
            seen[id(o)] = o
            nxt += [(path + label, c) for label, c in _children(o) if type(c) not in _ATOMS]
        level = nxt
    return None

def _culprit(named: dict[str, Any]) -> str | None:
    "Path to the object in `named` (label -> object) that cannot be pickled, with its type; None if all can be."
    for obj in named.values():
        probe = _Probe(io.BytesIO(), mode='dry')
        try: probe.dump(obj)
        except Exception: break
    else: return None
    bad = probe.last
    path = _path_to(named, bad) if _fails_alone(bad) else None
    return None if path is None else f"{path}: <{type(bad).__name__}>"

def find_unpicklable(obj: Any, path: str = 'obj') -> str | None:
    "Path to the part of `obj` that cannot be pickled, with its type, e.g. `learn.cbs[3].gen: <generator>`."
    return _culprit({path: obj})

def check_picklable(named: dict[str, Any]) -> None:
    "Raise `PayloadError` naming the part of `named` (label -> object) that cannot be pickled, by its shortest path."
    where = _culprit(named)
    if where:
        raise PayloadError(f"cannot send {where} to the workers: it cannot be pickled (or copied into another process "
                           "meaningfully). Create it inside the worker function instead, or pass what it is made from.")

def _call_labels(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    "`fn` and its arguments, each labelled by the parameter it binds to (`args[i]`, `kwargs[k]` where `fn` has none)."
    try: sig = inspect.signature(fn); bound = sig.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return {'fn': fn, **{f'args[{i}]': a for i, a in enumerate(args)}, **{f'kwargs[{k!r}]': v for k, v in kwargs.items()}}
    out = {'fn': fn}
    for name, v in bound.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL: out.update({f'{name}[{i}]': a for i, a in enumerate(v)})
        elif kind is inspect.Parameter.VAR_KEYWORD: out.update({f'{name}[{k!r}]': a for k, a in v.items()})
        else: out[name] = v
    return out

def check_call(fn: Callable, args: tuple, kwargs: dict, need: dict, arg_names: dict[str, Any] | None = None) -> None:
    """Raise `PayloadError` naming what cannot be pickled in the call `fn(*args, **kwargs)`, its `need` globals or the
    notebook globals it references; paths start from `arg_names` (name -> argument) first, then from `fn`'s parameters."""
    check_picklable({**(arg_names or {}), **_call_labels(fn, args, kwargs), **{f'need[{k!r}]': v for k, v in need.items()}})
    check_picklable({f'global {k}': v for k, v in referenced_globals((fn, args, kwargs), need).items()})
