"""Inference under DDP: each rank runs `get_preds`, `tta` or `validate` on its own shard of one DataLoader; the caller
puts the shards back together in the order a local call returns.

A rank's shard is its share of the DataLoader's own (unshuffled) batches, unpadded, so no item is counted twice and
every batch is one a local call forms; nothing the worker's Learner detaches is gathered across ranks. `validate` combines the metric accumulators across ranks, as a fit does.
"""
from __future__ import annotations
from dataclasses import dataclass
from typing import Any
import torch
from fastai.torch_core import to_detach
from .group import rank_world
from .metrics import ExactMetrics
from .sharding import shard_dl, share_loader_workers
from .training import DRAWN_BY_CALLER, DDPJob, worker_learner

__all__ = ['INFERENCE', 'Shard', 'rank_shard', 'infer_in_worker', 'merge_shards']

INFERENCE = ('get_preds', 'tta', 'validate')

@dataclass(frozen=True)
class Shard:
    "A rank's predictions: `result` as `get_preds`/`tta` return it for its items, and `keys` that sort them into place."
    keys: list[int]
    result: Any

def rank_shard(dl, rank: int, world: int) -> tuple:
    """Rank `rank`'s share of `dl` as a new DataLoader, as training shards validation: whole batches of the local order
    (a text batch pads as it does locally), whole streams for a language model; with the dataset indices it yields,
    and their positions in `dl`'s own order."""
    order = list(dl.get_idxs())
    shard = dl.new(shuffle=False, drop_last=False)
    shard_dl(shard, rank, world, pad=False, seed=0, by_batch=True)
    share_loader_workers(shard)
    idxs, where = list(shard.get_idxs()), {i: p for p, i in enumerate(order)}
    return shard, idxs, [where[i] for i in idxs]

def infer_in_worker(job: DDPJob) -> Shard | Any:
    """Worker side of `learn.ddp(n).get_preds/tta/validate(...)`: run `job.method` (its arguments by name in `job.kwargs`)
    on this rank's shard. `get_preds`/`tta` return a `Shard`: sorting every rank's keys together puts the items where
    a local call puts them (dataset order, or the DataLoader's own with `reorder=False`). `validate` returns rank 0's
    whole-set values."""
    rank, world = rank_world()
    method = job.method
    learn, _ = worker_learner(job.source, {}, rank0_drops=DRAWN_BY_CALLER, quiet=True)
    learn.to_detach = lambda b, cpu=True, gather=True: to_detach(b, cpu, gather=False)   # DataLoaders fastai makes too
    kwargs = dict(job.kwargs)
    dl = kwargs.pop('dl', None) or learn.dls[kwargs.pop('ds_idx', 1)].new(shuffle=False, drop_last=False)
    if method == 'tta':   # augmentations before sharding: a DataLoader made later would gather again
        item_tfms, batch_tfms = kwargs.pop('item_tfms', None), kwargs.pop('batch_tfms', None)
        if item_tfms is not None or batch_tfms is not None: dl = dl.new(after_item=item_tfms, after_batch=batch_tfms)
    shard, idxs, positions = rank_shard(dl, rank, world)
    learn.model.to(learn.dls.device)
    if method == 'validate':
        with learn.added_cbs(ExactMetrics()): res = learn.validate(dl=shard)
        return res if rank == 0 else None
    if not idxs: return Shard([], None)
    if method == 'tta': return Shard(sorted(idxs), learn.tta(dl=shard, **kwargs))   # tta's own get_preds sorts by index
    keys = idxs if kwargs.get('reorder', True) else positions
    return Shard(keys, learn.get_preds(dl=shard, **{**kwargs, 'reorder': False}))

def _cat(parts: list, order: torch.Tensor):
    "One result element from every rank's: tensors concatenated and put in `order`, tuples and lists element-wise."
    first = next((p for p in parts if p is not None), None)
    if first is None: return None
    if isinstance(first, torch.Tensor): return torch.cat([p for p in parts if p is not None])[order]
    if isinstance(first, (tuple, list)): return type(first)(_cat([p[i] for p in parts], order) for i in range(len(first)))
    raise TypeError(f"cannot put together per-rank results of type {type(first).__name__}")

def merge_shards(shards: list[Shard]):
    "Every rank's `Shard` as one result, its items sorted by key across ranks."
    shards = [s for s in shards if s.keys]
    return _cat([s.result for s in shards], torch.tensor([k for s in shards for k in s.keys]).argsort())
