"""fastai in the worker: the `DistributedRunner` callback turns a Learner's fit into one DDP training across the group
(the counterpart of fastai's own `fastai.distributed`, without its CUDA-only and accelerate-only parts).

Training batches: every rank draws the same shuffled order (a seed shared at `before_fit`) and takes its share of it,
padded so all ranks step together (`sharding`). Validation: unpadded shards of whole batches, the local run's own, on
the plain module (no collective in the forward); then the metric accumulators are combined across ranks before the
Recorder reads them (it is an `ExactMetrics`), so every rank logs the exact whole-set values a single process would.

`split_batches`: each rank instead takes its part of every local batch (`split_dl`) and weights its loss by its share of
the batch's items times the world (DDP averages gradients over ranks), so each step's gradient is the local batch's;
every rank's `learn.loss` is the local batch's loss, and `GradientAccumulation` counts the local batch's items.
"""
from __future__ import annotations
import random
import numpy as np
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastai.callback.core import CancelBatchException
from fastai.callback.training import GradientAccumulation
from fastai.torch_core import apply
from ._private import ddp_ignore_parameters
from .group import local_device, rank_world
from .metrics import ExactMetrics
from .sharding import BatchSplit, share_loader_workers, shard_dl, split_dl, unshard_dl
from .state import opt_state_to

__all__ = ['DistributedRunner', 'ModuleDDP', 'SplitGradientAccumulation']

def _comm_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')

def _fold_rank_into_rngs(rank: int) -> None:
    """Make this rank's global RNGs (Python's, numpy's, torch's) its own: workers forked from one process start with
    identical states, and would draw the same dropout masks, MixUp mixes and DataLoader-worker seeds (so the same
    augmentations) on every rank. Each is reseeded from its own next draw and the rank: deterministic, distinct per rank."""
    random.seed(f'{random.getrandbits(64)}-{rank}')
    np.random.seed([int(np.random.randint(2**31)), rank])
    torch.manual_seed(random.Random(f'{int(torch.randint(0, 2**62, ()))}-{rank}').getrandbits(63))

class ModuleDDP(DistributedDataParallel):
    "DistributedDataParallel that also answers for its module's attributes and methods (`reset`, `encoder`, ...), as fastai's callbacks expect of `learn.model`."
    def __getattr__(self, name: str):
        try: return super().__getattr__(name)
        except AttributeError:
            if name == 'module': raise
            return getattr(self.module, name)

class SplitGradientAccumulation(GradientAccumulation):
    "fastai's `GradientAccumulation` under `split_batches`: it counts the local batch's items, so every rank steps together, as locally."
    def __init__(self, n_acc: int, split: BatchSplit):
        super().__init__(n_acc)
        self.split,self.count = split,0
    def _items(self) -> int: return self.split[self.iter][1]
    def after_loss(self): self.learn.loss_grad /= self.n_acc / self._items()
    def before_step(self):
        self.count += self._items()
        if self.count < self.n_acc: raise CancelBatchException()   # skip step and zero_grad, as fastai's
        self.count = 0

def _first(b, n: int):
    "Batch `b` (a tensor, or tuples of them) cut to its first `n` items."
    return apply(lambda t: t[:n] if isinstance(t, torch.Tensor) and t.ndim else t, b)

class DistributedRunner(ExactMetrics):
    "Wrap the model in DistributedDataParallel, shard the dataloaders across ranks, and keep the metrics exact."
    order = 11
    def __init__(self, sync_bn: bool = True, split_batches: bool = False, **ddp_kwargs):
        self.sync_bn,self.split_batches,self.ddp_kwargs,self.training_fit = sync_bn,split_batches,ddp_kwargs,False

    def before_fit(self):
        super().before_fit()
        self.rank, self.world = rank_world()
        self.device = local_device()
        self.learn.model.to(self.device)
        self.learn.dls.device = self.device
        if self.learn.opt is not None: opt_state_to(self.learn.opt, self.device)
        seed = torch.randint(0, 2**31 - 1, (1,), device=_comm_device() if self.world > 1 else 'cpu')
        if self.world > 1: dist.broadcast(seed, 0)
        seed = int(seed.item())
        if self.world > 1: _fold_rank_into_rngs(self.rank)
        self.split = None
        if self.split_batches and self.world > 1:
            saved, self.split = split_dl(self.dls.train, self.rank, self.world, seed)
            self.saved = [(self.dls.train, saved)]
            self._swap_accumulation()
        else: self.saved = [(self.dls.train, shard_dl(self.dls.train, self.rank, self.world, pad=True, seed=seed))]
        self.saved += [(dl, shard_dl(dl, self.rank, self.world, pad=False, seed=seed + i, by_batch=True))
                       for i, dl in enumerate(self.dls.loaders[1:], 1)]
        for dl in self.dls.loaders: share_loader_workers(dl)
        sync = self.sync_bn and self.world > 1 and self.device.type == 'cuda'   # SyncBatchNorm runs on GPUs only
        self.plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if sync else self.model
        # parameters with no elements (the BatchNorm1d(0) of a TabularModel without continuous columns, as collab's
        # use_nn=True builds) never get a gradient: DDP would call them unused
        empty = [n for n, p in self.plain.named_parameters() if p.numel() == 0]
        if empty: ddp_ignore_parameters(self.plain, empty)
        # one process has no gradients to average: DDP's per-step hooks, bucket copies and buffer broadcasts would only
        # cost time (0.84x a local fit on an H200 with a small CNN)
        self.ddp_model = self.plain if self.world == 1 else ModuleDDP(
            self.plain, device_ids=[self.device.index] if self.device.type == 'cuda' else None, **self.ddp_kwargs)
        self.learn.model,self.training_fit = self.ddp_model,True

    def _swap_accumulation(self):
        "Each `GradientAccumulation` on the Learner counts the local batch's items for this fit (`SplitGradientAccumulation`)."
        self.swapped = [(cb, SplitGradientAccumulation(cb.n_acc, self.split))
                        for cb in self.learn.cbs if type(cb) is GradientAccumulation]
        for old, new in self.swapped:
            self.learn.remove_cb(old)
            self.learn.add_cb(new)

    def after_loss(self):
        """Under `split_batches`, weight this rank's loss by its share of the local batch's items times the world (DDP then
        averages the ranks' gradients into the local batch's), and make `learn.loss` the local batch's loss on every rank."""
        if self.split is None or not self.training: return
        mine, total = self.split[self.iter]
        share = mine / total
        loss = (self.learn.loss.detach().double() * share).to(_comm_device())
        dist.all_reduce(loss)
        self.learn.loss_grad = self.learn.loss_grad * (share * self.world)
        self.learn.loss = loss.to(self.learn.loss.device, self.learn.loss.dtype)

    def after_batch(self):
        "A rank that had no item of the batch stepped on one, weighted 0: the metrics after us see none."
        if self.split is None or not self.training or self.split[self.iter][0]: return
        self.learn.pred, self.learn.xb, self.learn.yb = (_first(b, 0) for b in (self.pred, self.xb, self.yb))

    def before_validate(self):
        "Validate rank 0's exact model (BatchNorm statistics included) on the plain module: no collective in the forward."
        if not self.training_fit: return
        if self.world > 1:
            for b in self.plain.buffers(): dist.broadcast(b.data, 0)
        self.learn.model = self.plain
        super().before_validate()
    def after_validate(self):
        if not self.training_fit: return
        self.learn.model = self.ddp_model
        super().after_validate()

    def before_epoch(self):
        "Rank 0's files from the previous epoch (SaveModelCallback, runs after us in `after_epoch`) exist before anyone goes on."
        if self.epoch and self.world > 1: dist.barrier()

    def after_fit(self):
        if self.world > 1 and self.training_fit: dist.barrier()   # ... and before SaveModelCallback loads them in `after_fit`
        if hasattr(self, 'plain'): self.learn.model = self.plain
        self.training_fit = False
        for old, new in getattr(self, 'swapped', []):
            self.learn.remove_cb(new)
            self.learn.add_cb(old)
        self.swapped, self.split = [], None
        for dl, saved in getattr(self, 'saved', []): unshard_dl(dl, saved)
        self.saved = []
