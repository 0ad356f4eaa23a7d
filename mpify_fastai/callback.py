"""fastai in the worker: `DistributedRunner` turns a Learner's fit into one DDP training across the group.

Training batches: every rank draws the same shuffled order (a seed shared at `before_fit`) and takes every
world-th index, padded so all ranks step together. Validation: unpadded shards on the plain module (no
collective in the forward), then the metric accumulators are summed or gathered across ranks before the
Recorder reads them, so every rank logs the exact whole-set values a single process would.
"""
from __future__ import annotations
import os, random, warnings
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss
from fastai.metrics import AccumMetric
from fastai.torch_core import to_detach
from .ddp import local_device, rank_world

__all__ = ['DistributedRunner', 'shard_dl', 'reduce_metrics']

_SHARD_ATTRS = ('get_idxs', 'to_detach', 'n', 'rng')

def shard_dl(dl, rank: int, world: int, pad: bool, seed: int) -> dict:
    """Make `dl` yield only rank `rank`'s share of each epoch's indices (padded by repetition to equal length if
    `pad`); its `to_detach` stops gathering. Returns what `unshard_dl` needs to undo it."""
    saved = {k: dl.__dict__[k] for k in _SHARD_ATTRS if k in dl.__dict__}
    full_n, full_get_idxs = dl.n, dl.get_idxs
    per_rank = -(-full_n // world) if pad else len(range(rank, full_n, world))
    def get_idxs():
        dl.n = full_n
        try: idxs = list(full_get_idxs())
        finally: dl.n = per_rank
        if pad and len(idxs) % world: idxs = (idxs * (world // max(1, len(idxs)) + 2))[:-(-len(idxs) // world) * world]
        return idxs[rank::world]
    dl.get_idxs, dl.n, dl.rng = get_idxs, per_rank, random.Random(seed)
    dl.to_detach = lambda b, cpu=True, gather=True: to_detach(b, cpu, gather=False)
    return saved

def unshard_dl(dl, saved: dict):
    for k in _SHARD_ATTRS: dl.__dict__.pop(k, None)
    dl.__dict__.update(saved)

def _comm_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')

def _cat(ts: list) -> torch.Tensor | None:
    ts = [t for t in ts if t is not None and t.numel()]
    return torch.cat(ts) if ts else None

def reduce_metrics(mets) -> None:
    """Combine each rank's metric accumulators into whole-set values on every rank: sums for `AvgMetric`/`AvgLoss`
    (and any metric with `total`/`count`), gathered predictions for `AccumMetric`. `AvgSmoothLoss` is already global."""
    world = dist.get_world_size()
    if world == 1: return
    dev, warned = _comm_device(), []
    sums = [m for m in mets if isinstance(m, (AvgMetric, AvgLoss)) or (hasattr(m, 'total') and hasattr(m, 'count'))]
    if sums:
        t = torch.tensor([[float(m.total), float(m.count)] for m in sums], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        for m, (total, count) in zip(sums, t.tolist()): m.total, m.count = total, int(count)
    accums = [m for m in mets if isinstance(m, AccumMetric)]
    if accums:
        mine = [(_cat(m.preds), _cat(m.targs)) for m in accums]
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        for i, m in enumerate(accums):
            p, t = _cat([r[i][0] for r in everyone]), _cat([r[i][1] for r in everyone])
            m.preds, m.targs = ([p], [t]) if p is not None else ([], [])
    for m in mets:
        if not (m in sums or m in accums or isinstance(m, AvgSmoothLoss)) and type(m).__name__ not in warned:
            warned.append(type(m).__name__)
            warnings.warn(f"mpify_fastai: metric {getattr(m, 'name', m)!r} ({type(m).__name__}) has no known way to combine "
                          "across ranks; each rank reports its own shard's value")

class DistributedRunner(Callback):
    """Wrap the model in DistributedDataParallel, shard the dataloaders across ranks, keep validation metrics
    exact, and (rank 0) checkpoint the weights at each epoch end to `checkpoint` if given."""
    order = 11
    def __init__(self, sync_bn: bool = True, checkpoint: str | None = None, **ddp_kwargs):
        self.sync_bn,self.checkpoint,self.ddp_kwargs,self.training_fit = sync_bn,checkpoint,ddp_kwargs,False

    def before_fit(self):
        self.rank, self.world = rank_world()
        self.device = local_device()
        self.learn.model.to(self.device)
        self.learn.dls.device = self.device
        if self.learn.opt is not None: _opt_state_to(self.learn.opt, self.device)
        seed = torch.randint(0, 2**31 - 1, (1,), device=_comm_device() if self.world > 1 else 'cpu')
        if self.world > 1: dist.broadcast(seed, 0)
        seed = int(seed.item())
        self.saved = [(dl, shard_dl(dl, self.rank, self.world, pad=(i == 0), seed=seed + i)) for i, dl in enumerate(self.dls.loaders)]
        sync = self.sync_bn and self.world > 1 and self.device.type == 'cuda'   # SyncBatchNorm runs on GPUs only
        self.plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if sync else self.model
        self.ddp_model = DistributedDataParallel(self.plain, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                                           **self.ddp_kwargs)
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

    def after_epoch(self):
        if self.checkpoint and self.rank == 0:
            sd = {k: v.detach().cpu() for k, v in self.plain.state_dict().items()}
            tmp = f"{self.checkpoint}.tmp"
            torch.save({'epoch': self.epoch, 'state_dict': sd}, tmp)
            os.replace(tmp, self.checkpoint)

    def before_epoch(self):
        "Rank 0's files from the previous epoch (SaveModelCallback, runs after us in `after_epoch`) exist before anyone goes on."
        if self.epoch and self.world > 1: dist.barrier()

    def after_fit(self):
        if self.world > 1 and self.training_fit: dist.barrier()   # ... and before SaveModelCallback loads them in `after_fit`
        if hasattr(self, 'plain'): self.learn.model = self.plain
        self.training_fit = False
        for dl, saved in getattr(self, 'saved', []): unshard_dl(dl, saved)
        self.saved = []

def _opt_state_to(opt, device):
    "Move a fastai Optimizer's per-parameter state to `device` (state saved on another device would not step)."
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor): state[k] = v.to(device)
