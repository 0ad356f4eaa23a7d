"""Exact metrics under DDP: each rank's metric accumulators are combined into the whole validation set's, on every rank,
before the Recorder reads them, so every rank logs the values a single process would.
"""
from __future__ import annotations
import warnings
import torch, torch.distributed as dist
from fastai.learner import AvgSmoothLoss

__all__ = ['accumulator_names', 'metric_shares', 'combine_metric_shares', 'reduce_metrics']

_ADDITIVE = (int, float, torch.Tensor, list, dict)

def accumulator_names(m) -> list[str]:
    """The attributes a metric's `reset()` assigns (its accumulators: `total`/`count`, `inter`/`union`, `preds`/`targs`,
    ...), found by resetting a copy that records assignments; [] where that cannot be done."""
    assigned = []
    class Recording(type(m)):
        def __setattr__(self, k, v):
            assigned.append(k)
            object.__setattr__(self, k, v)
    try:
        probe = object.__new__(Recording)
        probe.__dict__.update(m.__dict__)
        probe.reset()
    except Exception: return []
    return sorted({k for k in assigned if isinstance(getattr(probe, k, None), _ADDITIVE)})

def _cpu(v):
    if isinstance(v, torch.Tensor): return v.detach().cpu()
    if isinstance(v, list): return [_cpu(x) for x in v]
    if isinstance(v, dict): return {k: _cpu(x) for k, x in v.items()}
    return v

def _combine(values: list):
    """Whole-set value of one accumulator from every rank's: numbers and tensors add up (in float64, back in their type),
    lists of numbers add up element-wise, other lists (batches of predictions) concatenate, dicts combine per key."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _combine([v[k] for v in values if k in v]) for k in dict.fromkeys(k for v in values for k in v)}
    if isinstance(first, list):
        if all(isinstance(x, (int, float)) for v in values for x in v) and len({len(v) for v in values}) == 1:
            return [_combine(list(xs)) for xs in zip(*values)]
        return [x for v in values for x in v]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]   # a rank that saw no batch still holds its 0
    if tensors: return sum(torch.as_tensor(v).double() for v in values).to(tensors[0].dtype)
    total = sum(values)
    return int(total) if all(isinstance(v, int) for v in values) else float(total)

def metric_shares(mets) -> list:
    "This rank's accumulators of each metric (name -> value, on the CPU), or None for `AvgSmoothLoss` (already global)."
    return [None if isinstance(m, AvgSmoothLoss) else {k: _cpu(getattr(m, k)) for k in accumulator_names(m)} for m in mets]

def combine_metric_shares(mets, shares_by_rank: list[list]) -> list[str]:
    """Set each metric's accumulators to the whole set's, from every rank's `metric_shares` (in rank order, so every rank
    computes the same values); returns the type names of metrics that have no accumulators to combine."""
    uncombinable = []
    for i, m in enumerate(mets):
        shares = [r[i] for r in shares_by_rank]
        if shares[0] is None: continue
        if not shares[0]:
            if type(m).__name__ not in uncombinable: uncombinable.append(type(m).__name__)
            continue
        for k in shares[0]: setattr(m, k, _combine([s[k] for s in shares]))
    return uncombinable

def reduce_metrics(mets) -> None:
    """Combine each rank's metric accumulators into whole-set values on every rank. The rule is general: whatever a
    metric's `reset()` assigns is an accumulator, and accumulators add up (or concatenate); a metric without any
    (`ValueMetric`, say) reports this rank's value, with a warning."""
    world = dist.get_world_size()
    if world == 1: return
    everyone = [None] * world
    dist.all_gather_object(everyone, metric_shares(mets))
    for m in combine_metric_shares(mets, everyone):
        warnings.warn(f"mpify_fastai: metric {m} has no known way to combine across ranks; each rank reports its own "
                      "shard's value")
