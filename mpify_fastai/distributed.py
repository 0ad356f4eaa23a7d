"""fastai in the worker: `DistributedRunner` turns a Learner's fit into one DDP training across the group
(the counterpart of fastai's own `fastai.distributed`, without its CUDA-only and accelerate-only parts).

Training batches: every rank draws the same shuffled order (a seed shared at `before_fit`) and takes every
world-th index, padded so all ranks step together (a language model's loader: a block of its text streams).
Validation: unpadded shards of whole batches, the local run's own, on the plain module (no collective in the
forward), then the metric accumulators are summed or gathered across ranks before the Recorder reads them, so every
rank logs the exact whole-set values a single process would.
"""
from __future__ import annotations
import os, random, warnings
from contextlib import contextmanager
import numpy as np
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastai.callback.core import Callback
from fastai.learner import AvgSmoothLoss
from fastai.torch_core import defaults, to_detach
from .ddp import local_device, rank_world
from .worker import seed_global_rngs

__all__ = ['DistributedRunner', 'ModuleDDP', 'shard_dl', 'unshard_dl', 'share_loader_workers', 'accumulator_names', 'metric_shares',
           'combine_metric_shares', 'reduce_metrics', 'opt_state_to']

_SHARD_ATTRS = ('get_idxs', 'to_detach', 'n', 'rng', 'bs', 'create_item')

@contextmanager
def _global_rngs_seeded(seed: int):
    "Python's, numpy's and torch's global RNGs seeded with `seed` inside, and each back to its own state after."
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_global_rngs(seed)
    try: yield
    finally: random.setstate(states[0]); np.random.set_state(states[1]); torch.set_rng_state(states[2])

def _fold_rank_into_rngs(rank: int) -> None:
    """Make this rank's global RNGs (Python's, numpy's, torch's) its own: workers forked from one process start with
    identical states, and would draw the same dropout masks, MixUp mixes and DataLoader-worker seeds (so the same
    augmentations) on every rank. Each is reseeded from its own next draw and the rank: deterministic, distinct per rank."""
    random.seed(f'{random.getrandbits(64)}-{rank}')
    np.random.seed([int(np.random.randint(2**31)), rank])
    torch.manual_seed(random.Random(f'{int(torch.randint(0, 2**62, ()))}-{rank}').getrandbits(63))

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

def share_loader_workers(dl) -> int:
    """Give `dl` this rank's share of the host's DataLoader workers when it has fastai's default (one per core, up to
    16), as each rank gets its share of the cores' threads: N ranks that each start the default would run N times the
    processes the host has cores for. A number the user chose stays. Returns the workers `dl` now has."""
    loader = getattr(dl, 'fake_l', None)
    if loader is None: return 0
    ranks_here = int(os.environ.get('LOCAL_WORLD_SIZE', rank_world()[1]))
    if ranks_here > 1 and loader.num_workers == min(16, defaults.cpus) > 0:
        loader.num_workers = defaults.cpus // ranks_here
    return loader.num_workers

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

def _comm_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')

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

class ModuleDDP(DistributedDataParallel):
    "DistributedDataParallel that also answers for its module's attributes and methods (`reset`, `encoder`, ...), as fastai's callbacks expect of `learn.model`."
    def __getattr__(self, name: str):
        try: return super().__getattr__(name)
        except AttributeError:
            if name == 'module': raise
            return getattr(self.module, name)

class DistributedRunner(Callback):
    "Wrap the model in DistributedDataParallel, shard the dataloaders across ranks, and keep validation metrics exact."
    order = 11
    def __init__(self, sync_bn: bool = True, **ddp_kwargs):
        self.sync_bn,self.ddp_kwargs,self.training_fit = sync_bn,ddp_kwargs,False

    def before_fit(self):
        self.rank, self.world = rank_world()
        self.device = local_device()
        self.learn.model.to(self.device)
        self.learn.dls.device = self.device
        if self.learn.opt is not None: opt_state_to(self.learn.opt, self.device)
        seed = torch.randint(0, 2**31 - 1, (1,), device=_comm_device() if self.world > 1 else 'cpu')
        if self.world > 1: dist.broadcast(seed, 0)
        seed = int(seed.item())
        if self.world > 1: _fold_rank_into_rngs(self.rank)
        self.saved = [(dl, shard_dl(dl, self.rank, self.world, pad=(i == 0), seed=seed + i, by_batch=(i > 0)))
                      for i, dl in enumerate(self.dls.loaders)]
        for dl in self.dls.loaders: share_loader_workers(dl)
        sync = self.sync_bn and self.world > 1 and self.device.type == 'cuda'   # SyncBatchNorm runs on GPUs only
        self.plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if sync else self.model
        # parameters with no elements (the BatchNorm1d(0) of a TabularModel without continuous columns, as collab's
        # use_nn=True builds) never get a gradient: DDP would call them unused
        empty = [n for n, p in self.plain.named_parameters() if p.numel() == 0]
        if empty: DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.plain, empty)
        # one process has no gradients to average: DDP's per-step hooks, bucket copies and buffer broadcasts would only
        # cost time (0.84x a local fit on an H200 with a small CNN)
        self.ddp_model = self.plain if self.world == 1 else ModuleDDP(
            self.plain, device_ids=[self.device.index] if self.device.type == 'cuda' else None, **self.ddp_kwargs)
        self.learn.model,self.training_fit = self.ddp_model,True

    def before_validate(self):
        "Validate rank 0's exact model (BatchNorm statistics included) on the plain module: no collective in the forward."
        if not self.training_fit: return
        if self.world > 1:
            for b in self.plain.buffers(): dist.broadcast(b.data, 0)
        self.learn.model = self.plain
    def after_validate(self):
        if not self.training_fit: return
        self.learn.model = self.ddp_model
        reduce_metrics(self.recorder._valid_mets)
    def after_train(self):
        if getattr(self.recorder, 'train_metrics', False): reduce_metrics(self.recorder._train_mets[1:])

    def before_epoch(self):
        "Rank 0's files from the previous epoch (SaveModelCallback, runs after us in `after_epoch`) exist before anyone goes on."
        if self.epoch and self.world > 1: dist.barrier()

    def after_fit(self):
        if self.world > 1 and self.training_fit: dist.barrier()   # ... and before SaveModelCallback loads them in `after_fit`
        if hasattr(self, 'plain'): self.learn.model = self.plain
        self.training_fit = False
        for dl, saved in getattr(self, 'saved', []): unshard_dl(dl, saved)
        self.saved = []

def opt_state_to(opt, device: torch.device | None = None) -> None:
    """Move a fastai Optimizer's per-parameter state to `device`, by default each parameter's own (state saved on
    another device would not step)."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor): state[k] = v.to(p.device if device is None else device)
