"""Each rank's share of a fastai DataLoader: training shares of one shared epoch order (every world-th index, or, with
`split_dl`, a slice of every local batch), validation in the local run's whole batches, a language model's loader by
text streams; and each rank's share of the host's loader workers.
"""
from __future__ import annotations
import os, random
from contextlib import contextmanager
from dataclasses import dataclass, field
import numpy as np
import torch
from fastai.torch_core import defaults, to_detach
from ._private import loader_workers, set_loader_workers
from .group import rank_world
from .worker import seed_global_rngs

__all__ = ['shard_dl', 'split_dl', 'BatchSplit', 'unshard_dl', 'share_loader_workers']

_SHARD_ATTRS = ('get_idxs', 'to_detach', 'n', 'rng', 'bs', 'create_item', 'drop_last')

@contextmanager
def _global_rngs_seeded(seed: int):
    "Python's, numpy's and torch's global RNGs seeded with `seed` inside, and each back to its own state after."
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_global_rngs(seed)
    try: yield
    finally: random.setstate(states[0]); np.random.set_state(states[1]); torch.set_rng_state(states[2])

def shard_dl(dl, rank: int, world: int, pad: bool, seed: int, by_batch: bool = False) -> dict:
    """Make `dl` yield only rank `rank`'s share of each epoch's indices (padded by repetition to equal length if
    `pad`); its `to_detach` stops gathering. Every rank draws the same epoch order from a shared seed: the DataLoader's
    own `rng`, and the global RNGs too while it orders (`SortedDL` shuffles with numpy's), which then go back to this
    rank's own state, so augmentation stays per rank. `by_batch` (unpadded): rank r takes the local epoch's whole
    batches r, r+world, ..., so each batch is one a local run forms (a padded text batch pads as locally, and fastai's
    text classifier's outputs depend on that padding). Returns what `unshard_dl` needs to undo it."""
    saved = {k: dl.__dict__[k] for k in _SHARD_ATTRS if k in dl.__dict__}
    full_n, full_get_idxs, shared = dl.n, dl.get_idxs, random.Random(f'{seed}-global')
    if _is_lm_loader(dl): return _shard_lm_dl(dl, rank, world, seed, saved, shared)
    by_batch = by_batch and not pad and bool(dl.bs)
    per_rank = (sum(min(dl.bs, full_n - k) for k in range(0, full_n, dl.bs)[rank::world]) if by_batch else
                -(-full_n // world) if pad else len(range(rank, full_n, world)))
    def get_idxs():
        dl.n = full_n
        try:
            with _global_rngs_seeded(shared.getrandbits(63)): idxs = list(full_get_idxs())
        finally: dl.n = per_rank
        if by_batch: return [i for k in range(rank * dl.bs, len(idxs), world * dl.bs) for i in idxs[k:k + dl.bs]]
        if pad and len(idxs) % world: idxs = (idxs * (world // max(1, len(idxs)) + 2))[:-(-len(idxs) // world) * world]
        return idxs[rank::world]
    dl.get_idxs, dl.n, dl.rng = get_idxs, per_rank, random.Random(seed)
    dl.to_detach = lambda b, cpu=True, gather=True: to_detach(b, cpu, gather=False)
    return saved

@dataclass
class BatchSplit:
    """This rank's part of each local batch of a `split_dl` loader in the current epoch: `split[k]` is (items here, items
    in local batch k); `every`: the same for every batch (a language model's streams). A rank with no item of a batch
    loads that batch's first item, to step with the others."""
    shares: list[tuple[int, int]] = field(default_factory=list)
    every: tuple[int, int] | None = None
    def __getitem__(self, k: int) -> tuple[int, int]: return self.every or self.shares[k]

def _part(b: int, rank: int, world: int) -> slice:
    "Rank `rank`'s contiguous part of a batch of `b` items: sizes differ by at most one, larger first (rank 0 always has one)."
    q, extra = divmod(b, world)
    lo = rank * q + min(rank, extra)
    return slice(lo, lo + q + (rank < extra))

def split_dl(dl, rank: int, world: int, seed: int) -> tuple[dict, BatchSplit]:
    """Make training loader `dl` yield rank `rank`'s contiguous part of every batch the local run forms, from the local
    epoch order drawn with a shared seed (as `shard_dl`): as many batches as locally, and the ranks' parts in rank order
    are the local batch in its order. A language model's loader is split by streams (`shard_dl`: its batch split).
    Returns what `unshard_dl` needs and the `BatchSplit` by which the runner weights each rank's loss."""
    full_bs, n_batches = dl.bs, len(dl)
    if _is_lm_loader(dl):
        saved = shard_dl(dl, rank, world, pad=False, seed=seed)
        return saved, BatchSplit(every=(dl.bs, full_bs))
    if not full_bs: raise ValueError("split_batches needs a training DataLoader with a batch size (bs), not a prebatched one")
    saved = {k: dl.__dict__[k] for k in _SHARD_ATTRS if k in dl.__dict__}
    full_n, full_get_idxs, shared, split = dl.n, dl.get_idxs, random.Random(f'{seed}-global'), BatchSplit()
    part = _part(full_bs, rank, world)
    part_bs = max(1, part.stop - part.start)   # a rank without an item of a batch steps on one, weighted 0
    def get_idxs():
        dl.n, dl.bs = full_n, full_bs
        try:
            with _global_rngs_seeded(shared.getrandbits(63)): idxs = list(full_get_idxs())
        finally: dl.n, dl.bs = n_batches * part_bs, part_bs
        batches = [idxs[k:k + full_bs] for k in range(0, n_batches * full_bs, full_bs)]
        parts = [b[_part(len(b), rank, world)] for b in batches]
        split.shares = [(len(p), len(b)) for p, b in zip(parts, batches)]
        return [i for p, b in zip(parts, batches) for i in (p or b[:1])]
    dl.get_idxs, dl.n, dl.bs, dl.drop_last, dl.rng = get_idxs, n_batches * part_bs, part_bs, False, random.Random(seed)
    dl.to_detach = lambda b, cpu=True, gather=True: to_detach(b, cpu, gather=False)
    return saved, split

def share_loader_workers(dl) -> int:
    """Give `dl` this rank's share of the host's DataLoader workers when it has fastai's default (one per core, up to
    16), as each rank gets its share of the cores' threads: N ranks that each start the default would run N times the
    processes the host has cores for. A number the user chose stays. Returns the workers `dl` now has."""
    n = loader_workers(dl)
    if n is None: return 0
    ranks_here = int(os.environ.get('LOCAL_WORLD_SIZE', rank_world()[1]))
    if ranks_here > 1 and n == min(16, defaults.cpus) > 0: set_loader_workers(dl, n := defaults.cpus // ranks_here)
    return n

def _is_lm_loader(dl) -> bool:
    return any(f'{c.__module__}.{c.__qualname__}' == 'fastai.text.data.LMDataLoader' for c in type(dl).__mro__)

def _shard_lm_dl(dl, rank: int, world: int, seed: int, saved: dict, shared: random.Random) -> dict:
    """`shard_dl` for fastai's `LMDataLoader`: its `bs` rows are text streams that go on from batch to batch (the RNN
    carries its hidden state along them), and item `s` is window `s // bs` of stream `s % bs`. Each rank takes a block
    of whole streams, through every batch: its batches have `bs // world` rows (the effective batch stays `bs`, as in a
    local fit), every rank steps `n_batches` times, and each stream keeps its order and its hidden state (interleaved
    indices would tear streams apart and mix window lengths in a batch). The texts are shuffled with the shared seed."""
    full_n, full_bs, full_get_idxs, full_create_item = dl.n, dl.bs, dl.get_idxs, dl.create_item
    lo, hi = rank * full_bs // world, (rank + 1) * full_bs // world
    if hi == lo: raise ValueError(f"a language-model DataLoader needs bs >= the number of processes: bs={full_bs}, {world} processes")
    rows, per_rank = hi - lo, full_n // full_bs * (hi - lo)
    def get_idxs():
        dl.n, dl.bs = full_n, full_bs
        try:
            with _global_rngs_seeded(shared.getrandbits(63)): idxs = list(full_get_idxs())
        finally: dl.n, dl.bs = per_rank, rows
        return [i for i in idxs if lo <= i % full_bs < hi]
    def create_item(s):
        dl.n, dl.bs = full_n, full_bs     # the loader's geometry is the whole batch's
        try: return full_create_item(s)
        finally: dl.n, dl.bs = per_rank, rows
    dl.get_idxs, dl.create_item, dl.n, dl.bs, dl.rng = get_idxs, create_item, per_rank, rows, random.Random(seed)
    dl.to_detach = lambda b, cpu=True, gather=True: to_detach(b, cpu, gather=False)
    return saved

def unshard_dl(dl, saved: dict):
    "Undo `shard_dl`: `dl` draws the whole epoch again."
    for k in _SHARD_ATTRS: dl.__dict__.pop(k, None)
    dl.__dict__.update(saved)
