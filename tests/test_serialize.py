"""Unit tests of serialize.py: notebook code by value with its globals, tensors through a copy-on-write segment file."""
import os, subprocess, sys, time
import dill
import pytest
import torch
import helpers
from mpify_fastai.errors import PayloadError
from mpify_fastai.serialize import (SHARE_MIN_BYTES, check_picklable, dumps, find_unpicklable, loads,
                                   referenced_globals)

pytestmark = pytest.mark.usefixtures('no_leftovers')   # no torch_shm_manager, no stray /dev/shm files

NOTEBOOK = '''
import math
OFFSET = 7
FACTOR = 3
sq = lambda v: v * v
class Box:
    def __init__(self, v): self.v = v
    def scaled(self): return self.v * FACTOR
def helper(x): return sq(x) + OFFSET
def nb_fn(x):
    return [helper(x), Box(x).scaled(), math.floor(2.5), type(Box(1)).__name__, globals().get('HIDDEN')]
'''

LOADER = '''
import sys
from mpify_fastai.serialize import loads
fn, args = loads(open(sys.argv[1], 'rb').read())
try: print(repr(fn(*args)))
except Exception as e: print(type(e).__name__, e)
'''

def _load_in_fresh_process(payload, tmp_path) -> str:
    path = tmp_path / 'payload.bin'
    path.write_bytes(payload.data)
    r = subprocess.run([sys.executable, '-c', LOADER, str(path)], capture_output=True, text=True, timeout=60,
                       env=helpers.subprocess_env(), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()

def test_notebook_function_round_trip_in_fresh_process(main_ns, tmp_path):
    ns = main_ns(NOTEBOOK)
    assert ns['nb_fn'].__module__ == '__main__'
    payload = dumps((ns['nb_fn'], (4,)))
    assert payload.segment_path is None        # nothing large: no segment file
    assert _load_in_fresh_process(payload, tmp_path) == repr([4 * 4 + 7, 12, 2, 'Box', None])

def test_method_bound_to_a_lambda_round_trip(main_ns, tmp_path):
    """fastai's `Callback(before_fit=lambda self: ...)` binds a lambda to the callback: no attribute name finds it,
    so pickle's own reduction (getattr by name) fails on the receiving side."""
    import types
    ns = main_ns("class Holder:\n    def __init__(self, k): self.k = k\n"
                 "h = Holder(5)\nh.hook = __import__('types').MethodType(lambda self, x: self.k * x, h)\n"
                 "def call_hook(x): return h.hook(x)\n")
    assert isinstance(ns['h'].hook, types.MethodType) and ns['h'].hook.__name__ == '<lambda>'
    assert _load_in_fresh_process(dumps((ns['call_hook'], (3,))), tmp_path) == '15'

def test_need_ships_globals_the_code_does_not_name(main_ns, tmp_path):
    ns = main_ns(NOTEBOOK)
    payload = dumps((ns['nb_fn'], (2,)), need={'HIDDEN': {'k': 1}})
    assert _load_in_fresh_process(payload, tmp_path) == repr([11, 6, 2, 'Box', {'k': 1}])

def test_without_shipped_globals_the_function_breaks(main_ns, tmp_path):
    "Negative control: the round trip above works because globals are shipped, not by accident."
    ns = main_ns(NOTEBOOK)
    out = _load_in_fresh_process(dumps((ns['nb_fn'], (4,)), ship_globals=False), tmp_path)
    assert out.startswith('NameError') and "'helper'" in out

def test_referenced_globals_lists_what_dumps_ships(main_ns):
    ns = main_ns(NOTEBOOK)
    found = referenced_globals((ns['nb_fn'], (1,)))
    # FACTOR is used only by a method of Box: found through Box, as dumps finds it
    assert set(found) == {'helper', 'sq', 'OFFSET', 'Box', 'FACTOR', 'math'} and found['OFFSET'] == 7
    assert set(referenced_globals(ns['nb_fn'], skip={'Box'})) == {'helper', 'sq', 'OFFSET', 'math'}
    assert referenced_globals((1, 'x', [2.0])) == {}

def test_loads_installs_globals_into_main_unless_told_not_to(main_ns):
    ns = main_ns(NOTEBOOK)
    payload = dumps(ns['nb_fn'])
    for k in ('helper', 'OFFSET', 'FACTOR', 'sq', 'Box'): del ns[k]
    fn = loads(payload.data, install_globals=False)
    assert 'helper' not in ns
    fn = loads(payload.data)
    assert {'helper', 'OFFSET', 'FACTOR', 'sq', 'Box'} <= set(ns) and ns['OFFSET'] == 7
    assert fn(3)[:3] == [16, 9, 2]

# ---------------------------------------------------------------- tensors

def _digits_like():
    torch.manual_seed(0)
    X = torch.randn(1797, 64)
    y = torch.randint(0, 10, (1797,))
    return X, y, [(X[i], y[i]) for i in range(len(X))]

def test_views_payload_is_small(tmp_path):
    X, y, ds = _digits_like()
    t = time.perf_counter()
    p = dumps(ds, segment_dir=str(tmp_path))
    took = time.perf_counter() - t
    assert len(p.data) < 300_000, len(p.data)
    assert p.segment_path.startswith(f'/proc/{os.getpid()}/fd/') and os.listdir(tmp_path) == []   # a file with no name
    assert p.nbytes == len(p.data) + os.path.getsize(p.segment_path)
    assert p.nbytes < 1_000_000, p.nbytes
    assert took < 10
    ds2 = loads(p.data)
    assert len(ds2) == 1797
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ds, ds2))
    # the views still view one storage in the receiver (they are not 1797 copies)
    assert len({x.untyped_storage().data_ptr() for x, _ in ds2}) == 1
    assert ds2[5][0].storage_offset() == 5 * 64

def test_plain_dill_drags_whole_storage_per_view(tmp_path):
    "Why the serializer exists: plain dill copies the whole 460 KB storage for every view (827 MB for 1797)."
    X, y, ds = _digits_like()
    sample = ds[:20]
    plain = len(dill.dumps(sample))
    ours = dumps(sample, segment_dir=str(tmp_path)).nbytes
    assert plain > 20 * X.untyped_storage().nbytes()
    assert plain > 15 * ours, (plain, ours)

class TaggedTensor(torch.Tensor):
    "A tensor subclass with per-instance state, like fastai's TensorImage."

@pytest.mark.parametrize('numel', [10, 50_000])   # inline and through the segment file
def test_tensor_subclass_round_trip(tmp_path, numel):
    base = torch.arange(float(numel))
    t = base.as_subclass(TaggedTensor)
    t.note = 'keep me'
    p = dumps({'t': t, 'view': t[2:7]}, segment_dir=str(tmp_path))
    assert (p.segment_path is not None) == (numel * 4 >= SHARE_MIN_BYTES)
    out = loads(p.data)
    assert type(out['t']) is TaggedTensor and out['t'].note == 'keep me'
    assert torch.equal(out['t'].as_subclass(torch.Tensor), base)
    assert type(out['view']) is TaggedTensor and out['view'].tolist() == [2., 3., 4., 5., 6.]

@pytest.mark.parametrize('numel', [10, 100_000])
def test_parameter_round_trip(tmp_path, numel):
    w = torch.nn.Parameter(torch.randn(numel))
    frozen = torch.nn.Parameter(torch.randn(numel), requires_grad=False)
    lin = torch.nn.Linear(300 if numel > 10 else 3, 4)
    ncv = torch.randn(40, 700).t()                        # non-contiguous view
    p = dumps((w, frozen, lin, ncv), segment_dir=str(tmp_path))
    w2, frozen2, lin2, ncv2 = loads(p.data)
    assert type(w2) is torch.nn.Parameter and w2.requires_grad and torch.equal(w2, w)
    assert type(frozen2) is torch.nn.Parameter and not frozen2.requires_grad and torch.equal(frozen2, frozen)
    assert type(lin2) is torch.nn.Linear and type(lin2.weight) is torch.nn.Parameter
    assert all(torch.equal(a, b) for a, b in zip(lin.state_dict().values(), lin2.state_dict().values()))
    assert ncv2.stride() == ncv.stride() and torch.equal(ncv2, ncv)
    w2.sum().backward()                                   # a usable leaf in the receiver
    assert torch.equal(w2.grad, torch.ones(numel))

@pytest.mark.parametrize('numel', [8, 20_000])
def test_conjugate_and_negative_views_keep_their_values(tmp_path, numel):
    "`.conj()` and its `.imag` are lazy views (conj / neg bit over the same storage): values must survive."
    z = torch.randn(numel, dtype=torch.complex64)
    zc, neg = z.conj(), z.conj().imag
    assert zc.is_conj() and neg.is_neg()
    p = dumps([z, zc, neg], segment_dir=str(tmp_path))
    out = loads(p.data)
    assert torch.equal(out[0], z) and torch.equal(out[1], zc) and torch.equal(out[2], neg)

def test_receiver_mutation_does_not_reach_sender_or_segment(tmp_path):
    X = torch.arange(100_000.)
    keep = X.clone()
    p = dumps([X, X[10:20]], segment_dir=str(tmp_path))
    assert os.path.getsize(p.segment_path) >= X.untyped_storage().nbytes()
    a, v = loads(p.data)
    a.add_(1)
    assert v[0].item() == keep[10].item() + 1     # views of one storage stay one storage in the receiver
    assert torch.equal(X, keep)                   # the sender's tensor is untouched
    a2, _ = loads(p.data)
    assert torch.equal(a2, keep)                  # and so is the segment file (copy-on-write mapping)

def test_no_segment_file_without_large_tensors(tmp_path):
    p = dumps([torch.ones(10), 'text'], segment_dir=str(tmp_path))
    assert p.segment_path is None and os.listdir(tmp_path) == [] and p.nbytes == len(p.data)

# ---------------------------------------------------------------- finding what cannot be pickled

class Obj:
    pass

def _learner_with_generator():
    learn = Obj()
    learn.model = [1, 2, 3]
    learn.dls = Obj()
    learn.dls.bs = 64
    learn.dls.after_item = (i for i in range(3))
    return learn

def test_find_unpicklable_names_the_path():
    learn = _learner_with_generator()
    assert find_unpicklable((1, learn), 'args') == 'args[1].dls.after_item: <generator>'
    assert find_unpicklable({'a': [1, {'b': (i for i in ())}]}, 'kw') == "kw['a'][1]['b']: <generator>"
    g = (i for i in ())
    fn = lambda: g
    assert find_unpicklable(fn, 'fn') == 'fn.<closure g>: <generator>'
    assert find_unpicklable((1, Obj(), [torch.ones(2)]), 'args') is None

def test_check_picklable_raises_payload_error():
    learn = _learner_with_generator()
    check_picklable({'args[0]': 1, 'kwargs["x"]': [2]})
    with pytest.raises(PayloadError) as ei:
        check_picklable({'args[0]': 1, 'args[1]': learn})
    assert 'args[1].dls.after_item: <generator>' in str(ei.value)
    assert isinstance(ei.value, TypeError)

def test_open_file_is_refused_and_left_intact(tmp_path):
    "dill reopened a pickled file in its mode, so 'w' truncated it in every receiver: an open file is refused, by path."
    path = tmp_path / 'log.txt'
    path.write_text('keep me\n')
    with open(path, 'a') as f:
        holder = Obj()
        holder.log = f
        with pytest.raises(Exception):
            dumps(holder, segment_dir=str(tmp_path))
        assert find_unpicklable({'cb': holder}, 'kw') == "kw['cb'].log: <TextIOWrapper>"
    assert path.read_text() == 'keep me\n' and not (tmp_path / 'seg').exists()

# ---------------------------------------------------------------- numpy and pandas

np = pytest.importorskip('numpy')
pd = pytest.importorskip('pandas')

DTYPES = ['bool', 'int8', 'uint16', 'int32', 'int64', 'float16', 'float32', 'float64', 'complex128', 'datetime64[ns]', '<U3',
          [('a', 'i4'), ('b', 'f8')]]

def _round_trip(obj, tmp_path):
    p = dumps(obj, segment_dir=str(tmp_path))
    return p, loads(p.data)

@pytest.mark.parametrize('n', [5, 40_000])
def test_tensors_over_one_memory_as_storages_of_two_sizes(tmp_path, n):
    "torch.from_numpy of a slice and of the whole array: two storages at one address, the first the smaller one."
    a = np.arange(n * 2, dtype=np.float32)
    head, whole = torch.from_numpy(a[:n]), torch.from_numpy(a)
    _, (h, w) = _round_trip([head, whole], tmp_path)
    assert h.tolist() == head.tolist() and w.tolist() == whole.tolist()

@pytest.mark.parametrize('n', [5, 40_000])   # in the pickle stream and through the segment file
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_numpy_dtypes_round_trip(tmp_path, dtype, n):
    a = (np.arange(n * 2) % 100).astype(dtype).reshape(n, 2)
    p, b = _round_trip(a, tmp_path)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(b, a)
    assert b.flags.writeable
    assert (p.segment_path is not None) == (a.nbytes >= SHARE_MIN_BYTES)
    assert len(p.data) < 10_000 or a.nbytes < SHARE_MIN_BYTES, "a large array went into the pickle stream"

def test_numpy_layouts_round_trip(tmp_path):
    "Non-contiguous, Fortran-ordered, negative strides, zero-size, 0-d, memory-mapped, object dtype: all survive."
    base = np.arange(200_000, dtype=np.float64).reshape(400, 500)
    mapped = np.memmap(tmp_path / 'mapped.bin', dtype=np.float32, mode='w+', shape=(50_000,))
    mapped[:] = 1.5
    cases = {'rows': base[::3], 'cols': base[:, 1::2], 'fortran': np.asfortranarray(base), 'transposed': base.T,
             'reversed': base[::-1, ::-2], 'empty': np.empty((0, 7), np.float32), 'scalar0d': np.array(3.5),
             'mapped': mapped, 'objects': np.array([1, 'two', None, {'k': [3]}, (4,)], dtype=object)}
    p, out = _round_trip(cases, tmp_path)
    for k, a in cases.items():
        b = out[k]
        assert b.dtype == a.dtype and b.shape == a.shape, k
        assert (b == a).all() if a.dtype == object else np.array_equal(b, a), k
        assert b.flags.writeable, k
    assert out['fortran'].flags.f_contiguous
    assert os.path.getsize(p.segment_path) >= base.nbytes

def test_numpy_scalars_keep_their_types(tmp_path):
    "fastai keeps lists of numpy ints (a DataLoader's `idxs`): they travel compactly and come back as the same types."
    xs = [np.int64(-3), np.uint8(200), np.float32(1 / 3), np.float64(2.5), np.bool_(True), np.complex64(1 + 2j), np.float16(0.1)]
    _, ys = _round_trip(xs, tmp_path)
    assert [type(y) for y in ys] == [type(x) for x in xs] and ys == xs
    idxs = list(np.arange(100_000))
    assert len(dumps(idxs).data) < 1_200_000, "numpy ints should take a few bytes each"

class _Loader:
    "Holds epoch indices as fastai's TabWeightedDL does (`self.idxs = list(np.random.choice(...))`)."
    def __init__(self, n): self.idxs = list(np.random.default_rng(0).choice(n, n))

def test_long_lists_of_numpy_numbers_an_object_holds_travel_as_arrays(tmp_path):
    """A 2M-row tabular Learner's loader keeps 1.6M numpy ints: one array, not a reduction each (24 MB of pickle and 5 s
    before). A list held elsewhere too keeps its identity; every item keeps its type and value."""
    dl = _Loader(200_000)
    shared = [np.float32(i) for i in range(10_000)]
    other = _Loader(5_000)
    other.shared, other.mixed = shared, [np.int64(1)] * 5_000 + [1]
    p, (dl2, other2, shared2) = _round_trip((dl, other, shared), tmp_path)
    assert dl2.idxs == dl.idxs and {type(x) for x in dl2.idxs} == {np.int64}
    assert other2.shared is shared2 and shared2 == shared and type(shared2[0]) is np.float32
    assert other2.mixed == other.mixed and [type(x) for x in other2.mixed[-2:]] == [np.int64, int]
    assert len(p.data) < 400_000, f"{len(p.data)} bytes: the 200,000 indices (1 MB one by one) should not be in the stream"

def test_receiver_writes_to_arrays_do_not_reach_sender_or_segment(tmp_path):
    a = np.arange(100_000, dtype=np.float32)
    keep = a.copy()
    p, b = _round_trip(a, tmp_path)
    b += 1
    assert np.array_equal(a, keep) and np.array_equal(loads(p.data), keep)

def test_dataframe_round_trip(tmp_path):
    "Mixed dtypes, categoricals and NaN: blocks go out of band, the frame comes back equal and writable."
    n = 50_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({'f32': rng.standard_normal(n).astype(np.float32), 'i64': np.arange(n), 'b': np.arange(n) % 3 == 0,
                       'cat': pd.Categorical(rng.choice(['a', 'b', 'c'], n)), 'txt': [f'r{i % 7}' for i in range(n)],
                       'when': pd.date_range('2020-01-01', periods=n, freq='min'),
                       'nan': np.where(np.arange(n) % 5 == 0, np.nan, 1.0)}, index=np.arange(n) * 2)
    p, out = _round_trip({'df': df, 'col': df['f32']}, tmp_path)
    pd.testing.assert_frame_equal(out['df'], df)
    pd.testing.assert_series_equal(out['col'], df['f32'])
    assert len(p.data) < df.memory_usage(deep=True).sum() / 4, "the numeric blocks should travel out of band"
    out['df'].loc[0, 'f32'] = 99.
    assert df.loc[0, 'f32'] != 99.

# ---------------------------------------------------------------- what comes back holds its own bytes

def test_a_view_travels_with_its_own_bytes_only(tmp_path):
    "A small view of a big storage (a received segment, a slice) sends its bytes, not the storage's."
    X = torch.arange(1_000_000.)
    p, (head, tail, again) = _round_trip([X[10:20], X[-5:], X[12:14]], tmp_path)
    assert p.nbytes < 10_000, p.nbytes
    assert head.tolist() == list(range(10, 20)) and tail.tolist() == [999_995., 999_996., 999_997., 999_998., 999_999.]
    assert head.untyped_storage().nbytes() < 1_000 and again.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    sent = dumps(X, segment_dir=str(tmp_path))
    p, back = _round_trip(loads(sent.data)[:3], tmp_path)
    assert back.tolist() == [0., 1., 2.] and p.nbytes < 1_000

# ---------------------------------------------------------------- code by value

CODE = '''
import functools
class Base:
    scale = 2
    def __init__(self, v): self.v = v
class Derived(Base):
    def __init__(self, v): super().__init__(v + 1)
    def value(self): return self.v * self.scale
def fact(n): return 1 if n == 0 else n * fact(n - 1)
def make_counter(start):
    def count(step=1, *, twice=False):
        nonlocal start
        start += step * (2 if twice else 1)
        return start
    count.label = 'counter'
    return count
def recursive_closure():
    def f(n): return 0 if n == 0 else 1 + f(n - 1)
    return f
'''

def test_notebook_code_by_value_keeps_its_identities(main_ns):
    "Classes, subclasses, super(), closures (recursive too), defaults, keyword defaults and function attributes."
    ns = main_ns(CODE)
    counter = ns['make_counter'](10)
    objs = [ns['Derived'](1), ns['Base'], counter, ns['recursive_closure'](), ns['fact'], lambda x: x + 1]
    payload = dumps(objs)
    for k in ('Base', 'Derived', 'fact', 'make_counter', 'recursive_closure'): del ns[k]
    d, base, count, rec, fact, inc = loads(payload.data)
    assert isinstance(d, base) and type(d).__bases__ == (base,) and d.value() == 4   # one Base, also as the base class
    assert ns['fact'] is fact                                                           # what the code names came with it
    assert ns['Base'] is base and ns['Derived'] is type(d)   # classes sent by value join __main__: results come home by name
    assert count() == 11 and count(2, twice=True) == 15 and count.label == 'counter' and count.__name__ == 'count'
    assert rec(5) == 5 and fact(5) == 120 and inc(1) == 2

KINDS = '''
import abc, dataclasses, functools, typing
@dataclasses.dataclass
class DC:
    a: int = 1
    b: list = dataclasses.field(default_factory=list)
class NT(typing.NamedTuple):
    x: int
    y: str = 'y'
class Slotted:
    __slots__ = ('p', 'q')
    def __init__(self): self.p, self.q = 1, 2
class Props(abc.ABC):
    K = 3
    @property
    def twice(self): return self.K * 2
    @classmethod
    def make(cls): return cls()
    @staticmethod
    def inc(x): return x + 1
    @abc.abstractmethod
    def f(self): ...
class Impl(Props):
    def f(self): return 'f'
    class Inner:
        v = 5
@functools.lru_cache(maxsize=8)
def cached(x): return x * 2
def use(dc, nt):
    return [dc.a, dc.b, nt.y, Slotted().q, Impl.make().twice, Impl.inc(1), Impl().f(), Impl.Inner.v, cached(4),
            isinstance(Impl(), Props), cached.cache_parameters()['maxsize']]
'''

def test_notebook_classes_of_every_kind_in_fresh_process(main_ns, tmp_path):
    "dataclass, NamedTuple, __slots__, property / classmethod / staticmethod, ABC, nested class, lru_cache."
    ns = main_ns(KINDS)
    out = _load_in_fresh_process(dumps((ns['use'], (ns['DC'](5, [1]), ns['NT'](3)))), tmp_path)
    assert out == repr([5, [1], 'y', 2, 6, 2, 'f', 5, 8, True, 8])

def test_payload_without_tensors_names_neither_torch_nor_fastai(main_ns, tmp_path):
    "A payload says it needs neither (the launcher starts it on spawn while the warm server is still starting)."
    ns = main_ns(CODE + KINDS)
    p = dumps((ns['use'], (ns['DC'](), ns['Derived'](1), ns['make_counter'](1), ns['cached'], np.zeros(100_000))),
              segment_dir=str(tmp_path))
    assert p.segment_path and not p.needs_torch and not {'torch', 'fastai'} & p.packages, p.packages
    assert dumps((ns['use'], (torch.zeros(2),))).needs_torch

@pytest.mark.parametrize('n', [3, 300])
def test_same_shape_other_strides_arrive_as_sent(tmp_path, n):
    "`m` and `m.t()` in one payload (one shape, two strides, one storage): each arrives as sent, sharing its storage."
    m = torch.arange(float(n * n)).reshape(n, n)
    p = dumps({'m': m, 'mt': m.t(), 'again': m.t()}, segment_dir=str(tmp_path))
    out = loads(p.data)
    assert torch.equal(out['m'], m) and torch.equal(out['mt'], m.t()) and torch.equal(out['again'], m.t())
    assert out['mt'].stride() == (1, n) and out['m'].stride() == (n, 1)
    assert out['mt'].untyped_storage().data_ptr() == out['m'].untyped_storage().data_ptr()
