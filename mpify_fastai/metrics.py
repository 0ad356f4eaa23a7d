"""Exact metrics under DDP: before the Recorder reads them, each rank's metrics hold the whole set's state, on every
rank, so every rank logs the values a local run would. Each metric goes one of two ways.

Proven (fastai's own classes, `PROVEN`, with their own reset, accumulate and value; no subclass or instance attribute
overrides one): their accumulators combine, which ships what they keep (two numbers for an `AvgMetric`, the predictions
for an `AccumMetric`). tests/test_exact_metrics.py's table of every `fastai.metrics` export proves this exact at 2-4
ranks. How an accumulator combines is decided from what `reset()` leaves in it: a number, or a list, array or tensor
with elements, adds up (in its own type and dtype); an empty list, tuple, deque, array, tensor or pandas object grows:
every rank's entries are concatenated in the local run's batch order; a dict (Counter, OrderedDict, defaultdict: kept)
combines key by key.

Replayed (everything else: a user's metric, a subclass): a value that `reset()` sets to 0 may be a sum, a maximum or the
last value seen, and nothing in the number says which; so no rule is guessed. While a batch is seen, the metric's
`accumulate` reads the Learner through a stand-in that passes reads through and keeps (on the CPU) the batch inputs it
read (`BATCH_INPUTS`: pred, yb, xb, y, x, loss, loss_grad). At the end of the phase the ranks exchange them, and every
rank resets the metric and runs its own `accumulate` over every rank's batches in the local run's batch order (rank r's
k-th batch is local batch `k * world + r`, as `sharding` cuts validation), each seen through a stand-in holding that
batch's inputs, `training`, `epoch`, `n_epoch`, `iter` (its local position), `n_iter` and `to_detach`. Whatever the
metric keeps (a maximum, the last batch, a set, a Counter, a DataFrame), its state is then a local run's, in its own
types. It costs the bytes of what the metric reads (one number per batch for a loss-based metric, the predictions for
one that reads them) and each rank replaying every batch: bench/RESULTS.md has the figures. Training metrics replay
in step order (each rank's k-th batch, rank by rank): a DDP step's batches are not a local run's, so there only values
that do not depend on how items are batched equal a local fit's. Under `split_batches` the steps are the local run's
batches: each step's parts are joined, in rank order, into the local batch (`loss`, already the local batch's, taken
once), and a part with no item is seen by no metric (an `AvgMetric` sums its parts: exact for a mean over items).

A metric that reads anything else while accumulating (learn.model, learn.dls, learn.loss_func, another callback), sets
an attribute of the Learner, draws from a global random generator, or whose replay raises, cannot be made exact: every
rank takes rank 0's own state of it (so callbacks that read it decide alike everywhere), and rank 0 warns once per fit,
naming the metric and what it read.
"""
from __future__ import annotations
import functools, operator, pickle, random, warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Union
import numpy as np, pandas as pd
import torch, torch.distributed as dist
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss
from fastai.metrics import (AccumMetric, CorpusBLEUMetric, Dice, DiceMulti, JaccardCoeff, JaccardCoeffMulti, LossMetric,
                            Perplexity)
from fastai.torch_core import to_detach
from fastcore.basics import detuplify
from ._private import train_metrics, valid_metrics

__all__ = ['ADD', 'GROW', 'UNKNOWN', 'Kind', 'PROVEN', 'BATCH_INPUTS', 'proven', 'accumulator_kinds', 'combined', 'MetricShare',
           'MetricInputs', 'MetricTracker', 'InexactMetricWarning', 'ExactMetrics']

ADD, GROW, UNKNOWN = 'add', 'grow', 'unknown'
Kind = Union[str, list, dict]   # ADD, GROW or UNKNOWN; a list: the kind of each element; a dict: of each key

PROVEN = (AvgMetric, AvgLoss, LossMetric, Perplexity, AccumMetric, Dice, DiceMulti, JaccardCoeff, JaccardCoeffMulti,
          CorpusBLEUMetric)
_OWN = ('reset', 'accumulate', 'value', 'accum_values')
BATCH_INPUTS = ('pred', 'yb', 'xb', 'y', 'x', 'loss', 'loss_grad')   # what a replay can present, kept as read
_PHASE = ('training', 'epoch', 'n_epoch', 'iter', 'n_iter', 'to_detach')   # what a replay presents of its own

def proven(m) -> bool:
    "True where `m` is of a `PROVEN` class and keeps that class's own reset, accumulate and value."
    base = next((c for c in type(m).__mro__ if c in PROVEN), None)
    return (base is not None and not set(_OWN) & set(getattr(m, '__dict__', {}))
            and all(getattr(type(m), a, None) is getattr(base, a, None) for a in _OWN))

# ---------------------------------------------------------------- proven metrics: accumulators combine

_NUMBER = (int, float, np.number, np.bool_)
_GROWING = (list, tuple, deque)

def _pandas(v) -> bool: return isinstance(v, (pd.Series, pd.DataFrame))

def _kind(reset_value) -> Kind | None:
    "The kind of accumulator `reset_value` (what `reset()` assigned) starts; None where it is no accumulator (a str, a function)."
    if reset_value is None: return UNKNOWN
    if isinstance(reset_value, _NUMBER): return ADD
    if isinstance(reset_value, (torch.Tensor, np.ndarray)):
        return ADD if reset_value.ndim == 0 or len(reset_value) else GROW
    if _pandas(reset_value): return ADD if len(reset_value) else GROW
    if isinstance(reset_value, _GROWING):
        return [_kind(x) for x in reset_value] if reset_value and not isinstance(reset_value, deque) else GROW
    if isinstance(reset_value, dict): return {k: _kind(v) for k, v in reset_value.items()}
    return None

def accumulator_kinds(m) -> dict[str, Kind]:
    """What each attribute a metric's `reset()` assigns accumulates (`total`/`count`, `inter`/`union`, `preds`/`targs`,
    ...), found by resetting a copy that records its assignments; {} where nothing is assigned or that cannot be done."""
    assigned = []
    class Recording(type(m)):
        def __setattr__(self, k, v):
            assigned.append(k)
            object.__setattr__(self, k, v)
    try:
        probe = object.__new__(Recording)
        probe.__dict__.update(m.__dict__)
        probe.reset()
    except Exception: return {}
    kinds = {k: _kind(getattr(probe, k, None)) for k in dict.fromkeys(assigned)}
    return {k: v for k, v in kinds.items() if v is not None}

def _length(v) -> int:
    if isinstance(v, torch.Tensor): return len(v) if v.ndim else 0
    return len(v) if isinstance(v, (*_GROWING, np.ndarray)) or _pandas(v) else 0

def _rebuilt(like, items):
    "`items` in the container type of `like` (a named tuple's fields, a deque's maxlen, a defaultdict's factory kept)."
    if isinstance(like, tuple) and hasattr(like, '_fields'): return type(like)(*items)
    if isinstance(like, deque): return deque(items, like.maxlen)
    if isinstance(like, dict) and hasattr(like, 'default_factory'): return type(like)(like.default_factory, items)
    return type(like)(items)

def _cpu(v):
    if isinstance(v, torch.Tensor): return v.detach().cpu()
    if isinstance(v, (list, tuple)): return _rebuilt(v, [_cpu(x) for x in v])
    if isinstance(v, dict): return _rebuilt(v, {k: _cpu(x) for k, x in v.items()})
    return v

@dataclass
class MetricShare:
    """One rank's accumulators of one proven metric, as they cross to the other ranks: `values` (name -> value, on the
    CPU) and, for each that grows, `marks`: its length as each of the rank's batches began."""
    values: dict[str, Any]
    marks: dict[str, list[int]] = field(default_factory=dict)

def _added(values: list):
    """The sum of every rank's number, array, tensor or pandas object, in its own type and dtype (floating tensors summed
    in float64, pandas objects label by label; a boolean, or an array or tensor of them, stays one: any of the ranks')."""
    first = values[0]
    if isinstance(first, (bool, np.bool_)): return type(first)(any(values))
    if _pandas(first): return functools.reduce(lambda a, b: a.add(b, fill_value=0), values)
    t = next((v for v in values if isinstance(v, torch.Tensor)), None)   # a rank that saw no batch may hold a plain 0
    if t is not None:
        wide = torch.float64 if t.is_floating_point() else t.dtype
        return functools.reduce(operator.add, [torch.as_tensor(v).to(wide) for v in values]).to(t.dtype)
    a = next((v for v in values if isinstance(v, np.ndarray)), None)
    if a is not None: values = [np.asarray(v, a.dtype) for v in values]
    return functools.reduce(operator.add, values)

def _slice(v, s: int, e: int):
    if isinstance(v, deque): return list(v)[s:e]
    return v.iloc[s:e] if _pandas(v) else v[s:e]

def _concatenated(chunks: list, like):
    "Chunks of a grown accumulator as one, in the type of `like` (tensors, arrays, pandas along their first axis)."
    filled = [c for c in chunks if _length(c)]
    if not filled: return like
    if all(isinstance(c, torch.Tensor) for c in filled): return torch.cat(filled)
    if all(isinstance(c, np.ndarray) for c in filled): return np.concatenate(filled)
    if all(_pandas(c) for c in filled): return pd.concat(filled)
    return _rebuilt(like, [x for c in filled for x in c])

def _in_batch_order(values: list, marks: list[list[int] | None]):
    "Every rank's grown accumulator cut into its batches (at `marks`) and put together in the local run's batch order."
    pieces = []
    for rank, (v, starts) in enumerate(zip(values, marks)):
        ends = list(starts[1:]) + [_length(v)] if starts else [_length(v)]
        pieces += [((k, rank), _slice(v, s, e)) for k, (s, e) in enumerate(zip(starts or [0], ends))]
    return _concatenated([p for _, p in sorted(pieces, key=lambda kp: kp[0])], values[0])

class _Uncombinable(Exception): pass

def combined(kind: Kind, values: list, marks: list[list[int] | None]):
    """The whole-set value of one accumulator of kind `kind` (`accumulator_kinds`) from every rank's `values` (in rank
    order), in the type of rank 0's; `marks`: where each rank's batches begin in one that grows (None: in rank order)."""
    if kind == GROW: return _in_batch_order(values, marks)
    if kind == ADD: return _added(values)
    if isinstance(kind, list):
        if any(not isinstance(v, (list, tuple)) or len(v) != len(kind) for v in values):
            raise _Uncombinable(f"its reset() leaves {len(kind)} entries, and accumulate changed how many")
        return _rebuilt(values[0], [combined(k, list(xs), [None] * len(values)) for k, xs in zip(kind, zip(*values))])
    if isinstance(kind, dict):
        keys = dict.fromkeys(k for v in values for k in v)
        return _rebuilt(values[0], {k: combined(kind[k] if k in kind else GROW if isinstance(
            next(v[k] for v in values if k in v), list) else ADD, [v[k] for v in values if k in v], [None] * len(values))
                                    for k in keys})
    if all(v is None for v in values): return None
    raise _Uncombinable("its reset() leaves None, which says nothing of how it adds up")

# ---------------------------------------------------------------- other metrics: accumulate replayed

@dataclass
class MetricInputs:
    """One rank's record of one replayed metric: for each of its batches, in its order, the batch inputs `accumulate`
    read (name -> value, on the CPU), and what else it read (`foreign`), which a replay cannot present."""
    batches: list[dict[str, Any]] = field(default_factory=list)
    foreign: set[str] = field(default_factory=set)

def _rng_marks():
    "What changes when Python's, numpy's or torch's global generator draws."
    s = np.random.get_state()
    cuda = torch.cuda.get_rng_state().numpy().tobytes() if torch.cuda.is_initialized() else None
    return random.getstate(), s[1].tobytes(), s[2:], torch.get_rng_state().numpy().tobytes(), cuda

@dataclass
class _Packed:
    """A tensor's bytes, copied on the CPU as a numpy array (unpickled 3-10x faster than a tensor here: 100 MB of batch
    predictions in 0.02-0.03 s), with what makes it that tensor again: dtype, shape, class, fastai metadata."""
    data: np.ndarray
    dtype: torch.dtype
    shape: tuple
    cls: type
    meta: dict

    def tensor(self) -> torch.Tensor:
        t = torch.from_numpy(self.data).view(self.dtype).reshape(self.shape).as_subclass(self.cls)
        t.__dict__.update(self.meta)
        return t

def _copied(v):
    "A batch input as a replay needs it: tensors `_Packed` (a copy: an in-place change made later stays out)."
    if isinstance(v, torch.Tensor):
        t = v.detach()
        return _Packed(t.cpu().reshape(-1).view(torch.uint8).numpy().copy(), t.dtype, tuple(t.shape), type(t), dict(t.__dict__))
    if isinstance(v, (list, tuple)): return _rebuilt(v, [_copied(x) for x in v])
    if isinstance(v, dict): return _rebuilt(v, {k: _copied(x) for k, x in v.items()})
    return v

def _unpacked(v):
    if isinstance(v, _Packed): return v.tensor()
    if isinstance(v, (list, tuple)): return _rebuilt(v, [_unpacked(x) for x in v])
    if isinstance(v, dict): return _rebuilt(v, {k: _unpacked(x) for k, x in v.items()})
    return v

class _Live:
    """The Learner as a watched `accumulate` sees it in a live batch: reads pass through; the batch inputs read are kept
    (one copy per batch, shared by every metric that reads it: `seen`), anything else read or set is noted."""
    def __init__(self, learn, kept: dict, seen: dict, inputs: MetricInputs):
        object.__setattr__(self, '_live', (learn, kept, seen, inputs))
    def __getattr__(self, k: str):
        learn, kept, seen, inputs = object.__getattribute__(self, '_live')
        v = getattr(learn, k)
        if k in BATCH_INPUTS: kept[k] = seen[k] if k in seen else seen.setdefault(k, _copied(v))
        elif k not in _PHASE: inputs.foreign.add(f'reads learn.{k}')
        return v
    def __setattr__(self, k: str, v):
        learn, _, _, inputs = object.__getattribute__(self, '_live')
        inputs.foreign.add(f'sets learn.{k}')
        setattr(learn, k, v)

class _Seen(dict):
    "The batch inputs read in the live batch (one copy, shared by every metric); `empty`: this rank's part of it has no item."
    empty = False

def _watched(accumulate, inputs: MetricInputs, seen: _Seen):
    "`accumulate` (a bound method) that records what it reads of each batch into `inputs` (None for a part with no item, not run)."
    def watched(learn):
        if seen.empty: return inputs.batches.append(None)
        kept, marks = {}, _rng_marks()
        accumulate(_Live(learn, kept, seen, inputs))
        if _rng_marks() != marks: inputs.foreign.add('draws from a global random generator')
        inputs.batches.append(kept)
    return watched

def _skipping(accumulate, seen: _Seen):
    "`accumulate` (a bound method) that does not run on a part with no item."
    def skipping(learn):
        if not seen.empty: accumulate(learn)
    return skipping

class _NotKept(AttributeError): pass

class _Replayed:
    "The Learner as a replayed `accumulate` sees it: one batch's inputs and where it stands in the local run; nothing else."
    def __init__(self, kept: dict, phase: dict): self.__dict__.update(phase, **{k: _unpacked(v) for k, v in kept.items()})
    def to_detach(self, b, cpu: bool = True, gather: bool = True): return to_detach(b, cpu, gather=False)
    def __getattr__(self, k: str):
        if k in ('x', 'y') and k + 'b' in self.__dict__: return detuplify(self.__dict__[k + 'b'])
        raise _NotKept(f"learn.{k}, which it did not read while the batch was seen")

def _local_order(per_rank: list[list]) -> list:
    "Every rank's batches in the local run's order: rank r's k-th is local batch `k * world + r`."
    return [r[k] for k in range(max(map(len, per_rank), default=0)) for r in per_rank if k < len(r)]

_ITEMS = ('pred', 'yb', 'xb', 'y', 'x')   # batch inputs with one row per item

def _joined(parts: list):
    "One batch input's parts, in rank order, as one: tensors along their first axis; tuples, lists and dicts entry by entry."
    first = parts[0]
    if isinstance(first, _Packed):
        ts = [p.tensor() for p in parts]
        return torch.cat(ts) if first.shape else ts[0]
    if isinstance(first, dict): return _rebuilt(first, {k: _joined([p[k] for p in parts]) for k in first})
    if isinstance(first, (list, tuple)): return _rebuilt(first, [_joined(list(xs)) for xs in zip(*parts)])
    return first

def _merged(step: list[dict]) -> dict:
    """The ranks' kept parts of one local batch (`split_batches`, rank order; None: a part with no item) as the local
    batch's: the items' inputs joined (kept where every part kept them); `loss`, already the local batch's, taken once;
    `loss_grad`, each part's weighted by its share times the world, as their mean."""
    filled = [p for p in step if p is not None]
    out = {k: _joined([p[k] for p in filled]) for k in _ITEMS if all(k in p for p in filled)}
    if any('loss' in p for p in filled): out['loss'] = next(p['loss'] for p in filled if 'loss' in p)
    if all('loss_grad' in p for p in filled): out['loss_grad'] = sum(_unpacked(p['loss_grad']) for p in filled) / len(step)
    return out

def _local_steps(per_rank: list[list[dict]]) -> list[dict]:
    "Every rank's parts of each local batch (`split_batches`: rank r's k-th batch is its part of local batch k), joined."
    return [_merged([r[k] for r in per_rank if k < len(r)]) for k in range(max(map(len, per_rank), default=0))]

def _replay(m, per_rank: list[list[dict]], phase: dict, parts: bool = False) -> str | None:
    """Reset `m` and run its `accumulate` over every rank's batches in local order (`parts`: each step's ranks' parts
    joined into the local batch); None, or why not (`m` then keeps its state)."""
    live, batches = dict(m.__dict__), _local_steps(per_rank) if parts else _local_order(per_rank)
    try:
        m.reset()
        for i, kept in enumerate(batches): m.accumulate(_Replayed(kept, dict(phase, iter=i, n_iter=len(batches))))
        return None
    except Exception as e:
        m.__dict__.clear(); m.__dict__.update(live)
        return f"replaying its accumulate raised {type(e).__name__}: {e}"

def _pickled(state: dict) -> bytes | None:
    import cloudpickle   # fastai's own dependency: pickles a lambda a metric keeps
    try: return cloudpickle.dumps(state)
    except Exception: return None

def _take_rank0_state(mets: list, which: list[int]) -> None:
    "Give each metric of `which` rank 0's state on every rank (one whose state does not pickle keeps each rank's own)."
    box = [{i: _pickled(dict(mets[i].__dict__)) for i in which} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() == 0: return
    for i, blob in box[0].items():
        if blob is not None: mets[i].__dict__.clear(); mets[i].__dict__.update(pickle.loads(blob))

# ---------------------------------------------------------------- one phase of one rank

class MetricTracker:
    """One rank's metrics through one phase (training or validation): the proven ones' accumulators (what `reset()` left,
    where each batch begins in those that grow), the others' inputs as `accumulate` reads them; at the end, every rank's
    shares combined into each metric; `parts`: its batches are the ranks' parts of the local batches (`split_batches`
    training), which a replay joins."""
    def __init__(self, mets: list, parts: bool = False):
        self.mets, self.parts, self.kinds, self.marks, self.seen = list(mets), parts, None, [], _Seen()
        self.proven = [proven(m) for m in self.mets]
        self.inputs = {i: MetricInputs() for i, m in enumerate(self.mets) if not self.proven[i] and not isinstance(m, AvgSmoothLoss)}
        # a part with no item: proven metrics skip it too (an AvgMetric's mean of no item is nan, even weighted by 0)
        skip = [i for i, p in enumerate(self.proven) if p and parts]
        self.own = {i: self.mets[i].__dict__.get('accumulate') for i in [*self.inputs, *skip]}
        for i, rec in self.inputs.items():
            try: self.mets[i].accumulate = _watched(self.mets[i].accumulate, rec, self.seen)
            except (AttributeError, TypeError): rec.foreign.add('cannot be watched (its accumulate cannot be wrapped)')
        for i in skip: self.mets[i].accumulate = _skipping(self.mets[i].accumulate, self.seen)

    def _known_kinds(self) -> list[dict[str, Kind] | None]:
        "Each proven metric's accumulator kinds, read once, right after the Recorder's reset (None for the others)."
        if self.kinds is None:
            self.kinds = [accumulator_kinds(m) if p else None for m, p in zip(self.mets, self.proven)]
        return self.kinds

    def batch_begins(self, empty: bool = False) -> None:
        """Note the length of each growing accumulator before this batch's `accumulate`; a new batch's inputs (`empty`: this
        rank's part of a split batch has no item, which no replayed metric sees)."""
        self.seen.clear()
        self.seen.empty = empty
        self.marks.append([{k: _length(getattr(m, k, None)) for k, kind in kinds.items() if kind == GROW}
                           if kinds is not None else {} for m, kinds in zip(self.mets, self._known_kinds())])

    def unwatch(self) -> None:
        "Give each replayed metric its own `accumulate` back."
        for i, own in self.own.items():
            if own is None: self.mets[i].__dict__.pop('accumulate', None)
            else: self.mets[i].accumulate = own

    def shares(self) -> list[MetricShare | MetricInputs | None]:
        "This rank's share of each metric (None where there is nothing to combine)."
        return [self.inputs[i] if i in self.inputs else None if kinds is None else
                MetricShare({k: _cpu(getattr(m, k, None)) for k in kinds},
                            {k: [batch[i][k] for batch in self.marks] for k in kinds if kinds[k] == GROW})
                for i, (m, kinds) in enumerate(zip(self.mets, self._known_kinds()))]

    def combine(self, shares_by_rank: list[list], phase: dict | None = None) -> dict[int, str]:
        """Set each metric's state to the whole set's from every rank's `shares()` (in rank order, so every rank gets the
        same; `phase`: the Learner's `training`, `epoch`, `n_epoch` for a replay); returns, by position, why a metric
        could not be made exact. Those take rank 0's state: a replay that raised, by replaying rank 0's batches alone
        (no collective: a failure on one rank only cannot leave the others waiting); the others from rank 0
        (`rank0_states`, what every rank decides alike from the shares)."""
        self.unwatch()
        problems, phase, self.rank0_states = {}, phase or {}, []
        for i, (m, kinds) in enumerate(zip(self.mets, self._known_kinds())):
            shares = [r[i] for r in shares_by_rank]
            if i in self.inputs and (foreign := sorted(set().union(*(s.foreign for s in shares)))):
                problems[i] = f"it {', '.join(foreign)}"
                self.rank0_states.append(i)
            elif i in self.inputs:
                why = _replay(m, [s.batches for s in shares], phase, self.parts)
                if why and _replay(m, [shares[0].batches], phase): why += " (here each rank keeps its own shard's)"
                if why: problems[i] = why
            elif kinds == {}:
                problems[i] = "its reset() assigns nothing to add up across ranks"
                self.rank0_states.append(i)
            elif kinds is not None:
                try: whole = {k: combined(kind, [s.values[k] for s in shares], [s.marks.get(k) for s in shares])
                              for k, kind in kinds.items()}
                except _Uncombinable as e:
                    problems[i] = str(e)
                    self.rank0_states.append(i)
                else:
                    for k, v in whole.items(): setattr(m, k, v)
        return problems

def _ranks() -> int: return dist.get_world_size() if dist.is_initialized() else 1

class InexactMetricWarning(UserWarning):
    "A metric that a DDP run cannot make exact: it reports rank 0's shard's value."

class ExactMetrics(Callback):
    """Every rank's validation metrics (and training metrics, with the Recorder's `train_metrics=True`) become the whole
    set's before the Recorder reads them; one that cannot be made exact takes rank 0's value, with one warning per fit."""
    order = 11   # before the Recorder (50), which resets the metrics at the start of a phase and reads them at its end
    split = None   # a `BatchSplit` where the training batches are parts of the local batches (the runner's `split_batches`)
    def before_fit(self): self.warned = set()
    def before_train(self):
        on = getattr(self.recorder, 'train_metrics', False) and _ranks() > 1
        self.tracker = MetricTracker(train_metrics(self.recorder), parts=self.split is not None) if on else None
    def before_validate(self): self.tracker = MetricTracker(valid_metrics(self.recorder)) if _ranks() > 1 else None
    def before_batch(self):
        if getattr(self, 'tracker', None) is not None:
            self.tracker.batch_begins(empty=self.tracker.parts and not self.split[self.iter][0])
    def after_train(self): self._combine()
    def after_validate(self): self._combine()
    def after_cancel_fit(self):
        "A fit cancelled inside a phase (`lr_find` stops in a batch): the metrics get their own `accumulate` back."
        if getattr(self, 'tracker', None) is not None: self.tracker.unwatch()
        self.tracker = None

    def _combine(self):
        tracker, self.tracker = getattr(self, 'tracker', None), None
        if tracker is None: return
        tracker.unwatch()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, tracker.shares())
        phase = dict(training=self.training, epoch=getattr(self, 'epoch', 0), n_epoch=getattr(self, 'n_epoch', 1))
        problems = tracker.combine(everyone, phase)
        if tracker.rank0_states: _take_rank0_state(tracker.mets, tracker.rank0_states)
        warned = self.__dict__.setdefault('warned', set())
        for i, why in problems.items():
            m = tracker.mets[i]
            name = getattr(m, 'name', type(m).__name__)
            if dist.get_rank() != 0 or name in warned: continue
            warned.add(name)
            msg = (f"metric {name} ({type(m).__name__}) cannot be made exact across ranks: {why}. Every rank reports "
                   f"rank 0's shard's value; a metric whose accumulate reads only learn.pred, yb, xb and loss is exact")
            warnings.warn(msg, InexactMetricWarning)
