"""Exact by construction: every metric fastai exports (its accumulators combined), and a user's metric of every shape
(its accumulate replayed), give under DDP the values a local `validate()` gives on the same weights (nprocs 2, 3, 4; a
validation set of 203 items, a multiple of neither bs=16 nor bs * nprocs), in `learn.ddp(n).validate()`, in the rows
`fit_ddp` logs, and in training metrics; a metric that cannot be made exact warns once per fit, naming what it read."""
import copy, warnings
from types import SimpleNamespace
from collections import Counter, OrderedDict, defaultdict, deque
import numpy as np, pandas as pd
import pytest
import torch
import fastai.metrics as fm
from fastai.learner import Metric
import metric_helpers as mh
import user_metric_helpers as um
from mpify_fastai.metrics import MetricTracker, accumulator_kinds, combined, proven
from fastai_helpers import digits_dls_plain, mlp, sgd_learner

pytestmark = [pytest.mark.usefixtures('no_leftovers'),
              pytest.mark.filterwarnings('ignore::UserWarning'), pytest.mark.filterwarnings('ignore::RuntimeWarning')]

def _close(a, b, tol=1e-5) -> bool:
    return all(abs(float(x) - float(y)) <= tol * max(1., abs(float(y))) for x, y in zip(a, b, strict=True))

def _wrong(names, ddp, local, tol=1e-6) -> list:
    return [(n, float(d), float(l)) for n, d, l in zip(names, ddp, local, strict=True) if not _close([d], [l], tol)]

def _trained(kind: str):
    learn = mh.metric_learner(kind)
    with learn.no_logging(): learn.fit(1)
    return learn

def test_the_table_covers_every_export_of_fastai_metrics():
    "Each name fastai.metrics exports is in the table, or left out with a reason."
    missing = set(fm.__all__) - {name for name, _, _ in mh.TABLE} - set(mh.LEFT_OUT)
    assert not missing, f"metrics neither checked nor listed as left out: {sorted(missing)}"

@pytest.mark.parametrize('nprocs', [2, 3, 4])
@pytest.mark.parametrize('kind', mh.KINDS)
def test_every_metric_validates_as_locally(kind, nprocs):
    "learn.ddp(n).validate() equals learn.validate() for every metric of the table, to 1e-5."
    learn = _trained(kind)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        local = learn.validate()
    names = [m.name for m in learn.metrics]
    ddp = learn.ddp(nprocs).validate()
    assert len(ddp) == len(local) == len(names) + 1
    wrong = [(n, float(d), float(l)) for n, d, l in zip(['loss'] + names, ddp, local) if not _close([d], [l])]
    assert not wrong, f"{kind}, {nprocs} ranks: (metric, ddp, local) differ: {wrong}"

@pytest.mark.parametrize('kind', ['custom', 'segmentation', 'sequence'])
def test_fit_ddp_rows_equal_a_local_validate(kind):
    "The row fit_ddp logs (the DistributedRunner's own combining) equals a local validate() on the weights it returns."
    learn = mh.metric_learner(kind)
    learn.fit_ddp(1, nprocs=3, progress=False)
    row = [float(v) for v in learn.recorder.values[-1][1:]]     # read before validate() replaces it
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        local = [float(v) for v in learn.validate()]
    assert _close(row, local), (row, local)

def test_training_metrics_combine_across_ranks():
    """With train_metrics=True (lr 0, no dropout or BatchNorm: each item's prediction is fixed) the training columns equal
    a local fit's, fastai's and a user's (maxima, sets, pandas counts, ... replayed): every training item counted once."""
    def make():
        learn = sgd_learner(digits_dls_plain(192, 64, bs=16, shuffle=True), mlp(), lr=0.,
                            metrics=[fm.accuracy, mh.PerItemMedian(), mh.IntCounter(), mh.ClassCounts()]
                            + [m() for m in um.PER_ITEM])
        learn.recorder.train_metrics = True
        return learn
    local = make()
    with local.no_logging(): local.fit(1)
    learn = make()
    learn.fit_ddp(1, nprocs=2, progress=False)
    names = list(learn.recorder.metric_names)
    train_cols = [i for i, n in enumerate(names) if n.startswith('train_') and n != 'train_loss']
    assert len(train_cols) == 4 + len(um.PER_ITEM), names
    ddp_row, local_row = learn.recorder.values[-1], local.recorder.values[-1]
    assert _close([ddp_row[i - 1] for i in train_cols], [local_row[i - 1] for i in train_cols]), (ddp_row, local_row)
    assert ddp_row[train_cols[2] - 1] > 0

def test_fastai_metrics_are_proven_and_every_other_metric_is_replayed():
    "Every fastai.metrics export of the table takes the accumulator path; a user's class or a subclass of fastai's never does."
    for kind in mh.KINDS:
        learn = mh.metric_learner(kind)
        theirs = [m for m in learn.metrics if type(m).__module__.startswith('fastai.')]
        assert theirs and all(proven(m) for m in theirs), (kind, [type(m).__name__ for m in theirs if not proven(m)])
    learn = um.user_learner([m() for m in um.EXACT])
    assert not [type(m).__name__ for m in learn.metrics if proven(m)]

def _user_trained(metrics: list, n_valid: int = mh.N_VALID):
    "A digits classifier trained locally enough (4 epochs) that its predictions vary, with `metrics`."
    learn = um.user_learner(metrics, n_valid, lr=.5)
    with learn.no_logging(), learn.no_bar(): learn.fit(4)
    return learn

@pytest.mark.parametrize('nprocs', [2, 3, 4])
def test_user_metrics_validate_as_locally(nprocs, capfd):
    """Each of the user-metric shapes gives under learn.ddp(n).validate() what a local validate() gives, to 1e-6 (maxima,
    minima, last and first values, products, sets, Counters, pandas, nested, order-dependent, reading the inputs); each
    that cannot be made exact warns in the caller, naming itself and what it read, and nothing else warns."""
    learn = _user_trained([m() for m in um.EXACT] + [m() for m in um.UNEXACT])
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore')
        local = learn.validate()
    capfd.readouterr()
    ddp = learn.ddp(nprocs).validate()
    err = capfd.readouterr().err
    n = 1 + len(um.EXACT)
    wrong = _wrong(['loss'] + [m.__name__ for m in um.EXACT], ddp[:n], local[:n])
    assert not wrong, f"{nprocs} ranks: (metric, ddp, local) differ: {wrong}"
    for cls, read in um.UNEXACT.items():
        assert f"({cls.__name__}) cannot be made exact across ranks: {read}" in err, err
    assert err.count('cannot be made exact') == len(um.UNEXACT), err

def test_user_metrics_in_fit_ddp_rows_warn_once_per_fit(capfd):
    """The rows fit_ddp logs (the DistributedRunner's own combining, 2 epochs, 3 ranks) equal a local validate() on the
    weights it returns for every exact user shape; each metric that cannot be made exact warns once in the fit, not
    once per epoch or per rank, and the fit completes."""
    learn = _user_trained([m() for m in um.EXACT] + [m() for m in um.UNEXACT])
    capfd.readouterr()
    learn.fit_ddp(2, nprocs=3, progress=False)
    err = capfd.readouterr().err
    assert len(learn.recorder.values) == 2
    row = [float(v) for v in learn.recorder.values[-1][1:]]     # read before validate() replaces it
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore')
        local = [float(v) for v in learn.validate()]
    n = 1 + len(um.EXACT)
    wrong = _wrong(['loss'] + [m.__name__ for m in um.EXACT], row[:n], local[:n])
    assert not wrong, f"(metric, fit_ddp row, local) differ: {wrong}"
    for cls in um.UNEXACT: assert err.count(f"({cls.__name__}) cannot be made exact") == 1, err

_Pair = um.Stats

def _np(dtype, *v): return np.array(v, dtype=dtype)
def _t(dtype, *v): return torch.tensor(v, dtype=dtype)

# (what reset() assigns, each of 2 ranks' value at the end, where each rank's batches began (growing ones), whole set)
TYPES = [
    (Counter(), [Counter(a=2), Counter(a=1, b=3)], None, Counter(a=3, b=3)),
    (OrderedDict(), [OrderedDict(b=1), OrderedDict(a=2, b=1)], None, OrderedDict(b=2, a=2)),
    (defaultdict(int), [defaultdict(int, a=1), defaultdict(int, a=1, c=5)], None, defaultdict(int, a=2, c=5)),
    ((0, 0.), [(1, .5), (2, .25)], None, (3, .75)),
    (_Pair(0, 0), [_Pair(1, 2), _Pair(3, 4)], None, _Pair(4, 6)),
    (deque(maxlen=3), [deque([1, 2, 3], 3), deque([4, 5], 3)], [[0, 2], [0]], deque([4, 5, 3], 3)),
    (pd.Series(0, index=range(3)), [pd.Series([1, 2, 3]), pd.Series([1, 0, 1])], None, pd.Series([2, 2, 4])),
    (pd.Series(dtype=float), [pd.Series([1., 2., 3.]), pd.Series([4.])], [[0, 2], [0]],
     pd.Series([1., 2., 4., 3.], index=[0, 1, 0, 2])),
    (pd.DataFrame(), [pd.DataFrame({'a': [1, 2]}), pd.DataFrame({'a': [3]})], [[0, 1], [0]],
     pd.DataFrame({'a': [1, 3, 2]}, index=[0, 0, 1])),
    (pd.DataFrame(0, index=[0], columns=['x']), [pd.DataFrame({'x': [2]}), pd.DataFrame({'x': [5]})], None,
     pd.DataFrame({'x': [7]})),
    (np.zeros(2, np.int8), [_np(np.int8, 100, 1), _np(np.int8, 100, 2)], None, _np(np.int8, -56, 3)),
    (np.zeros(2, bool), [_np(bool, 1, 0), _np(bool, 0, 0)], None, _np(bool, 1, 0)),
    (np.zeros(2, np.float16), [_np(np.float16, .5, 1), _np(np.float16, .25, 1)], None, _np(np.float16, .75, 2)),
    (np.zeros(1, np.complex64), [_np(np.complex64, 1j), _np(np.complex64, 2)], None, _np(np.complex64, 2 + 1j)),
    (np.array([], np.int32), [_np(np.int32, 1, 2), _np(np.int32, 3)], [[0, 1], [0]], _np(np.int32, 1, 3, 2)),
    (np.float32(0), [np.float32(1.5), np.float32(2)], None, np.float32(3.5)),
    (False, [False, True], None, True),
    (torch.zeros(2, dtype=torch.int8), [_t(torch.int8, 100, 1), _t(torch.int8, 100, 2)], None, _t(torch.int8, -56, 3)),
    (torch.zeros(2, dtype=torch.bool), [_t(torch.bool, 1, 0), _t(torch.bool, 0, 0)], None, _t(torch.bool, 1, 0)),
    (torch.zeros(1, dtype=torch.bfloat16), [_t(torch.bfloat16, 1.5), _t(torch.bfloat16, 2)], None, _t(torch.bfloat16, 3.5)),
    (torch.zeros(1, dtype=torch.complex64), [_t(torch.complex64, 1j), _t(torch.complex64, 2)], None,
     _t(torch.complex64, 2 + 1j)),
    (torch.zeros((), dtype=torch.int64), [torch.tensor(2**60), torch.tensor(1)], None, torch.tensor(2**60 + 1)),
    (torch.tensor([], dtype=torch.int16), [_t(torch.int16, 1, 2), _t(torch.int16, 3)], [[0, 1], [0]],
     _t(torch.int16, 1, 3, 2)),
]

class _Holds(Metric):
    def __init__(self, start): self.start = start
    def reset(self): self.acc = copy.deepcopy(self.start)

@pytest.mark.parametrize('start,values,marks,whole', TYPES, ids=lambda v: type(v).__name__ if not isinstance(v, list) else '')
def test_accumulators_combine_in_their_own_type(start, values, marks, whole):
    """An accumulator of fastai's proven path combines into its own type: Counter, OrderedDict, defaultdict (its
    factory), tuple, named tuple, deque (its maxlen), pandas Series and DataFrame, numpy and torch of each dtype."""
    kind = accumulator_kinds(_Holds(start))['acc']
    got = combined(kind, values, marks or [None] * len(values))
    assert type(got) is type(whole), (type(got), type(whole))
    if isinstance(whole, (pd.Series, pd.DataFrame)): assert got.equals(whole), got
    elif isinstance(whole, torch.Tensor): assert got.dtype == whole.dtype and torch.equal(got, whole), got
    elif isinstance(whole, np.ndarray): assert got.dtype == whole.dtype and np.array_equal(got, whole), got
    else: assert got == whole, got
    if isinstance(whole, deque): assert got.maxlen == whole.maxlen
    if isinstance(whole, defaultdict): assert got.default_factory is whole.default_factory

class _SeesTypes(Metric):
    "Notes what it reads: each input's class, dtype, shape, fastai metadata and values."
    def reset(self): self.seen = []
    def accumulate(self, learn):
        p, y, m = learn.pred, learn.y, learn.xb[0]
        self.seen.append((type(p), p.dtype, tuple(p.shape), getattr(p, 'img_size', None), p.float().sum().item(),
                          type(y), y.dtype, y.tolist(), m.dtype, m.tolist(), learn.iter))

def test_a_replay_sees_each_input_as_it_was_read():
    """Replayed on another rank, a batch's tensors keep their class (fastai's TensorImage, TensorCategory), dtype
    (bfloat16, bool), shape and metadata, and an in-place change made after the read does not reach them; `iter` is
    the batch's place in the local run. In one process: two ranks' trackers fed as the Recorder feeds them."""
    from fastai.torch_core import TensorCategory, TensorImage
    g = torch.Generator().manual_seed(0)
    def batch(i):
        pred = TensorImage(torch.randn(3, 2, 2, generator=g).to(torch.bfloat16), img_size=(2, 2))
        return SimpleNamespace(pred=pred, yb=(TensorCategory(torch.tensor([i, i + 1, i + 2])),), xb=(torch.rand(3, generator=g) > .5,),
                               y=None, iter=None)
    batches = [batch(i) for i in range(5)]
    for i, b in enumerate(batches): b.y = b.yb[0]
    local = _SeesTypes()
    local.reset()
    for i, b in enumerate(batches): b.iter = i; local.accumulate(b)
    trackers = []
    for r in range(2):
        m = _SeesTypes()
        m.reset()
        t = MetricTracker([m])
        for k, b in enumerate(batches[r::2]):
            t.batch_begins(); b.iter = k; m.accumulate(b)
            b.pred.add_(1)   # after the read: the replay must not see it
        trackers.append(t)
    shares = [t.shares() for t in trackers]
    for t in trackers:
        assert t.combine(shares) == {}
        assert t.mets[0].seen == local.seen

def test_a_replay_failing_on_one_rank_hangs_nothing():
    """A replay that raises on one rank only falls back there without a collective: the call returns (no rank left
    waiting), rank 0's value is the exact one, and rank 0, whose replay worked, does not warn."""
    learn = _user_trained([um.ReplayFailsOnRank1()])
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore')
        local = learn.validate()
    ddp = learn.ddp(2, timeout=60).validate()
    assert not _wrong(['loss', 'replay_fails_on_rank1'], ddp, local)
