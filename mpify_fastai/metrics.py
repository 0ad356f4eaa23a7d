"""Exact metrics under DDP: before the Recorder reads them, each rank's metric accumulators become the whole set's, on
every rank, so every rank logs the values a local run would.

How an accumulator combines is decided from what the metric's `reset()` leaves in it, never from the values it holds
later (equal-length lists of numbers are per-batch entries as often as a vector of counts):
- a number, or a list, array or tensor with elements (a fixed vector of counts), adds up, element by element;
- an empty list, tuple, array or tensor is one that `accumulate` grows: every rank's entries are concatenated in the
  local run's batch order (rank r's k-th batch is local batch `k * world + r`, as `sharding` cuts validation), so a
  value that depends on order (a median of per-batch losses, the last prediction) comes out as locally;
- a dict combines key by key; a key `reset()` did not make adds up if it holds a number, array or tensor, and is
  concatenated in rank order if it holds a list;
- `None`, or nothing at all (`ValueMetric`), has no whole-set value: each rank reports its own, with a warning.
Replaying every rank's batches through each metric's `accumulate` would also be exact, but it would ship every batch's
predictions and targets (whole masks, for segmentation) and could not know which attributes of the Learner a metric
reads; accumulators are what a metric itself keeps, usually a few numbers.
"""
from __future__ import annotations
import warnings
from dataclasses import dataclass, field
from typing import Any, Union
import numpy as np
import torch, torch.distributed as dist
from fastai.callback.core import Callback
from fastai.learner import AvgSmoothLoss
from ._private import train_metrics, valid_metrics

__all__ = ['ADD', 'GROW', 'UNKNOWN', 'Kind', 'accumulator_kinds', 'MetricShare', 'MetricTracker', 'ExactMetrics']

ADD, GROW, UNKNOWN = 'add', 'grow', 'unknown'
Kind = Union[str, list, dict]   # ADD, GROW or UNKNOWN; a list: the kind of each element; a dict: of each key

_NUMBER = (int, float, np.number, np.bool_)

def _kind(reset_value) -> Kind | None:
    "The kind of accumulator `reset_value` (what `reset()` assigned) starts; None where it is no accumulator (a str, a function)."
    if reset_value is None: return UNKNOWN
    if isinstance(reset_value, _NUMBER): return ADD
    if isinstance(reset_value, (torch.Tensor, np.ndarray)):
        return ADD if reset_value.ndim == 0 or len(reset_value) else GROW
    if isinstance(reset_value, (list, tuple)):
        return [_kind(x) for x in reset_value] if reset_value else GROW
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
    return len(v) if isinstance(v, (list, tuple, np.ndarray)) or (isinstance(v, torch.Tensor) and v.ndim) else 0

def _cpu(v):
    if isinstance(v, torch.Tensor): return v.detach().cpu()
    if isinstance(v, (list, tuple)): return type(v)(_cpu(x) for x in v)
    if isinstance(v, dict): return {k: _cpu(x) for k, x in v.items()}
    return v

@dataclass
class MetricShare:
    """One rank's accumulators of one metric, as they cross to the other ranks: `values` (name -> value, on the CPU) and,
    for each that grows, `marks`: its length as each of the rank's batches began."""
    values: dict[str, Any]
    marks: dict[str, list[int]] = field(default_factory=dict)

def _added(values: list):
    "The sum of every rank's number, array or tensor (tensors in float64, back in their dtype; ints stay ints)."
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors: return sum(torch.as_tensor(v).double() for v in values).to(tensors[0].dtype)
    if any(isinstance(v, np.ndarray) for v in values): return sum(np.asarray(v) for v in values)
    total = sum(values)
    return int(total) if all(isinstance(v, (int, np.integer)) for v in values) else total

def _concatenated(chunks: list):
    "Chunks of a grown accumulator as one, in the type they have (tensors and arrays along their first dimension)."
    filled = [c for c in chunks if _length(c)]
    if filled and all(isinstance(c, torch.Tensor) for c in filled): return torch.cat(filled)
    if filled and all(isinstance(c, np.ndarray) for c in filled): return np.concatenate(filled)
    out = [x for c in filled for x in c]
    return tuple(out) if chunks and isinstance(chunks[0], tuple) else out

def _in_batch_order(values: list, marks: list[list[int] | None]):
    "Every rank's grown accumulator cut into its batches (at `marks`) and put together in the local run's batch order."
    pieces = []
    for rank, (v, starts) in enumerate(zip(values, marks)):
        ends = list(starts[1:]) + [_length(v)] if starts else [_length(v)]
        pieces += [((k, rank), v[s:e]) for k, (s, e) in enumerate(zip(starts or [0], ends))]
    return _concatenated([p for _, p in sorted(pieces, key=lambda kp: kp[0])])

class _Uncombinable(Exception): pass

def _combined(kind: Kind, values: list, marks: list[list[int] | None]):
    "The whole-set value of one accumulator of kind `kind` from every rank's `values` (in rank order)."
    if kind == GROW: return _in_batch_order(values, marks)
    if kind == ADD: return _added(values)
    if isinstance(kind, list):
        if any(not isinstance(v, (list, tuple)) or len(v) != len(kind) for v in values):
            raise _Uncombinable(f"its reset() leaves {len(kind)} entries, and accumulate changed how many")
        return type(values[0])(_combined(k, list(xs), [None] * len(values)) for k, xs in zip(kind, zip(*values)))
    if isinstance(kind, dict):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _combined(kind[k] if k in kind else GROW if isinstance(next(v[k] for v in values if k in v), list)
                             else ADD, [v[k] for v in values if k in v], [None] * len(values)) for k in keys}
    if all(v is None for v in values): return None
    raise _Uncombinable("its reset() leaves None, which says nothing of how it adds up: assign what it starts from "
                        "(0 for a sum, [] for a list that grows)")

class MetricTracker:
    """One rank's metrics through one phase (training or validation): what `reset()` left in each accumulator, where each
    batch's entries begin in the ones that grow, and, at the end, every rank's accumulators combined into each metric."""
    def __init__(self, mets: list): self.mets, self.kinds, self.marks = list(mets), None, []

    def _known_kinds(self) -> list[dict[str, Kind] | None]:
        "Each metric's accumulator kinds, read once, right after the Recorder's reset (None: `AvgSmoothLoss`, already global)."
        if self.kinds is None:
            self.kinds = [None if isinstance(m, AvgSmoothLoss) else accumulator_kinds(m) for m in self.mets]
        return self.kinds

    def batch_begins(self) -> None:
        "Note the length of each growing accumulator before this batch's `accumulate`."
        self.marks.append([{k: _length(getattr(m, k, None)) for k, kind in kinds.items() if kind == GROW}
                           if kinds is not None else {} for m, kinds in zip(self.mets, self._known_kinds())])

    def shares(self) -> list[MetricShare | None]:
        "This rank's `MetricShare` of each metric (None where there is nothing to combine)."
        return [None if kinds is None else
                MetricShare({k: _cpu(getattr(m, k, None)) for k in kinds},
                            {k: [batch[i][k] for batch in self.marks] for k in kinds if kinds[k] == GROW})
                for i, (m, kinds) in enumerate(zip(self.mets, self._known_kinds()))]

    def combine(self, shares_by_rank: list[list[MetricShare | None]]) -> list[str]:
        """Set each metric's accumulators to the whole set's from every rank's `shares()` (in rank order, so every rank
        gets the same values); returns a line for each metric left with this rank's own value, and why."""
        problems = []
        for i, (m, kinds) in enumerate(zip(self.mets, self._known_kinds())):
            if kinds is None: continue
            name = type(m).__name__
            if not kinds:
                problems.append(f"metric {name}: its reset() assigns nothing to add up across ranks")
                continue
            shares = [r[i] for r in shares_by_rank]
            try: whole = {k: _combined(kind, [s.values[k] for s in shares], [s.marks.get(k) for s in shares])
                          for k, kind in kinds.items()}
            except _Uncombinable as e:
                problems.append(f"metric {name}: {e}")
                continue
            for k, v in whole.items(): setattr(m, k, v)
        return problems

class ExactMetrics(Callback):
    """Every rank's validation metrics (and training metrics, with the Recorder's `train_metrics=True`) become the whole
    set's before the Recorder reads them; a metric that cannot be combined reports this rank's value, with a warning."""
    order = 11   # before the Recorder (50), which resets the metrics at the start of a phase and reads them at its end
    def before_train(self):
        self.tracker = MetricTracker(train_metrics(self.recorder)) if getattr(self.recorder, 'train_metrics', False) else None
    def before_validate(self): self.tracker = MetricTracker(valid_metrics(self.recorder))
    def before_batch(self):
        if getattr(self, 'tracker', None) is not None: self.tracker.batch_begins()
    def after_train(self): self._combine()
    def after_validate(self): self._combine()

    def _combine(self):
        tracker, self.tracker = getattr(self, 'tracker', None), None
        if tracker is None or not dist.is_initialized() or dist.get_world_size() == 1: return
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, tracker.shares())
        for line in tracker.combine(everyone):
            warnings.warn(f"mpify_fastai: {line}; each rank reports its own shard's value")
