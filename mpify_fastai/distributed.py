"""fastai in the worker: `DistributedRunner` turns a Learner's fit into one DDP training across the group
(the counterpart of fastai's own `fastai.distributed`, without its CUDA-only and accelerate-only parts).

Training batches: every rank draws the same shuffled order (a seed shared at `before_fit`) and takes every
world-th index, padded so all ranks step together. Validation: unpadded shards on the plain module (no
collective in the forward), then the metric accumulators are summed or gathered across ranks before the
Recorder reads them, so every rank logs the exact whole-set values a single process would.
"""
from __future__ import annotations
import random, warnings
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss
from fastai.metrics import AccumMetric
from fastai.torch_core import to_detach
from .ddp import local_device, rank_world

__all__ = ['DistributedRunner', 'shard_dl', 'unshard_dl', 'metric_shares', 'combine_metric_shares', 'reduce_metrics',
           'opt_state_to']

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
    "Undo `shard_dl`: `dl` draws the whole epoch again."
    for k in _SHARD_ATTRS: dl.__dict__.pop(k, None)
    dl.__dict__.update(saved)

def _comm_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')

def _cat(ts: list) -> torch.Tensor | None:
    ts = [t for t in ts if t is not None and t.numel()]
    return torch.cat(ts) if ts else None

def _summable(m) -> bool: return isinstance(m, (AvgMetric, AvgLoss)) or (hasattr(m, 'total') and hasattr(m, 'count'))

def metric_shares(mets) -> list:
    """This rank's share of each metric's accumulator: ('sum', total, count) for `AvgMetric`/`AvgLoss` (and any metric
    with `total`/`count`), ('cat', preds, targs) for `AccumMetric`, None for what needs no combining or cannot be."""
    return [('sum', float(m.total), int(m.count)) if _summable(m) else
            ('cat', _cat(m.preds), _cat(m.targs)) if isinstance(m, AccumMetric) else None for m in mets]

def combine_metric_shares(mets, shares_by_rank: list[list]) -> list[str]:
    """Set each metric's accumulator to the whole set's, from every rank's `metric_shares` (in rank order, so every
    rank computes the same values); returns the names of metrics that cannot be combined."""
    uncombinable = []
    for i, m in enumerate(mets):
        shares = [r[i] for r in shares_by_rank]
        if shares[0] is None:
            if not isinstance(m, AvgSmoothLoss) and type(m).__name__ not in uncombinable: uncombinable.append(type(m).__name__)
        elif shares[0][0] == 'sum':   # a tensor stays one: `Perplexity` takes `torch.exp` of total/count
            total = sum(s[1] for s in shares)
            m.total, m.count = torch.tensor(total, dtype=torch.float64) if torch.is_tensor(m.total) else total, sum(s[2] for s in shares)
        else:
            p, t = _cat([s[1] for s in shares]), _cat([s[2] for s in shares])
            m.preds, m.targs = ([p], [t]) if p is not None else ([], [])
    return uncombinable

def reduce_metrics(mets) -> None:
    """Combine each rank's metric accumulators into whole-set values on every rank (`AvgSmoothLoss` is already
    global); warn about a metric that cannot be combined: it reports this rank's shard."""
    world = dist.get_world_size()
    if world == 1: return
    everyone = [None] * world
    dist.all_gather_object(everyone, metric_shares(mets))
    for m in combine_metric_shares(mets, everyone):
        warnings.warn(f"mpify_fastai: metric {m} has no known way to combine across ranks; each rank reports its own "
                      "shard's value")

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
