"""A Learner's trained state between processes: what rank 0 sends home (`learner_result`) and how it lands on a Learner
(`apply_result`): weights, recorder history, optimizer state, which parameters are frozen, the epoch counters."""
from __future__ import annotations
import signal, sys, threading
from contextlib import contextmanager
import torch
from fastai.learner import Learner
from fastcore.foundation import L
from torch.nn.parallel import DistributedDataParallel
from .errors import LaunchError

__all__ = ['learner_result', 'apply_result', 'interrupts_deferred', 'recorder_history', 'opt_state_to']

def learner_result(learn: Learner) -> dict:
    "What rank 0 sends home: weights (CPU), recorder history, optimizer state and epoch counters."
    rec = learn.recorder
    opt = None
    model = learn.model.module if isinstance(learn.model, DistributedDataParallel) else learn.model
    if learn.opt is not None:
        opt = learn.opt.state_dict()
        opt['state'] = [{k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in opt['state']]
        opt['requires_grad'] = [p.requires_grad for p in model.parameters()]   # frozen as it ended (`fine_tune` unfreezes)
        opt['frozen_idx'] = getattr(learn.opt, 'frozen_idx', None)
    hist = {k: getattr(rec, k) for k in ('values', 'losses', 'lrs', 'iters', 'metric_names', 'hps') if hasattr(rec, k)}
    if 'losses' in hist: hist['losses'] = [float(l) for l in hist['losses']]
    return dict(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, recorder=hist, opt=opt,
                epoch=getattr(learn, 'epoch', 0), n_epoch=getattr(learn, 'n_epoch', 0),
                final_record=getattr(learn, 'final_record', None))

@contextmanager
def interrupts_deferred():
    """An interrupt (SIGINT: Ctrl-C, a kernel interrupt) that arrives inside the block waits for its end, then is raised:
    the block is never left half done. In the main thread only (elsewhere signals do not arrive)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None: yield; return
    got = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try: yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            print("mpify_fastai: interrupted while the result was applied; it is applied whole", file=sys.stderr, flush=True)
            signal.raise_signal(signal.SIGINT)   # to the handler it was meant for

def apply_result(learn: Learner, res: dict) -> None:
    """Load a `learner_result` into `learn`: weights into its model on its device, history into its recorder, optimizer
    state, and which parameters are frozen (a `fine_tune` ends unfrozen). All of it or, if it does not fit, none of it:
    an interrupt meanwhile is raised once it is applied whole."""
    sd = res['state_dict']
    own = learn.model.state_dict()
    bad = [k for k in own if k not in sd or own[k].shape != sd[k].shape] + [k for k in sd if k not in own]
    if bad: raise LaunchError(f"the trained weights do not fit this Learner's model (mismatched keys: {bad[:5]})")
    with interrupts_deferred(): _apply(learn, res, sd)

def _apply(learn: Learner, res: dict, sd: dict) -> None:
    learn.model.load_state_dict(sd)
    if getattr(learn, 'dls', None) is not None: learn.model.to(learn.dls.device)   # where a local fit leaves it
    rec = learn.recorder
    for k, v in res['recorder'].items():
        if k == 'losses': v = [torch.tensor(x) for x in v]
        elif k == 'metric_names': v = L(v)
        setattr(rec, k, v)
    if res['opt'] is not None:
        if learn.opt is None: learn.create_opt()
        learn.opt.load_state_dict(res['opt'])
        opt_state_to(learn.opt)
        for p, rg in zip(learn.model.parameters(), res['opt'].get('requires_grad') or []): p.requires_grad_(rg)
        if res['opt'].get('frozen_idx') is not None: learn.opt.frozen_idx = res['opt']['frozen_idx']
    learn.epoch, learn.n_epoch, learn.final_record = res['epoch'], res['n_epoch'], res['final_record']

def recorder_history(rec) -> dict:
    "A Recorder's per-epoch rows and per-batch losses, learning rates and iteration counts, as `learner_result` has them."
    return dict(values=list(rec.values), losses=[float(l) for l in rec.losses], lrs=list(rec.lrs), iters=list(rec.iters))

def opt_state_to(opt, device: torch.device | None = None) -> None:
    """Move a fastai Optimizer's per-parameter state to `device`, by default each parameter's own (state saved on
    another device would not step)."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor): state[k] = v.to(p.device if device is None else device)
