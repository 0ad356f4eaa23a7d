"""Multi-node bridge: save the notebook's training as a job file, run it under torchrun, load the result back.

`learn.save_ddp_job("job.pkl", 10, lr=1e-3, method="fine_tune")` writes a self-contained pickle (tensors by
value, notebook code and what it references included); `torchrun ... -m mpify_fastai run job.pkl --result
result.pth` trains it with the same `DistributedRunner` as `fit_ddp`; `learn.load_ddp_result("result.pth")`
applies it. Rank 0 checkpoints every epoch, so a group restarted by torchrun resumes where it stopped.
A job file is a pickle: loading it runs code. Only run job files you made; the runner refuses one that
others can write to.
"""
from __future__ import annotations
import io, os, sys
from pathlib import Path
from typing import Callable
from fastai.learner import Learner
from fastcore.basics import noop, patch
from fastcore.foundation import L
from .imports import parse_imports, run_imports
from .jobfile import JobFileError, check_job_file, check_result_path, job_digest
from .serialize import dumps, loads

__all__ = ['save_job', 'load_ddp_job', 'run_job', 'RESUMABLE']

JOB_VERSION = 1
RESUMABLE = ('fit', 'fit_one_cycle', 'fit_flat_cos', 'fit_sgdr')   # schedules that take start_epoch

def _atomic_write(path: Path, data: bytes, mode: int = 0o600):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, 'wb') as f: f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)

def save_job(source: Learner | Callable[[], Learner], path: str | os.PathLike, *args, method: str = 'fit',
                 need: str = '', imports: str = '', sync_bn: bool = True, ddp_kwargs: dict | None = None, **kwargs) -> Path:
    "Write a self-contained, portable training job: `method(*args, **kwargs)` on `source` (a Learner or factory)."
    from .launch import _need_dict
    from .learner import SCHEDULES
    if method not in SCHEDULES: raise ValueError(f"method must be one of {SCHEDULES}, got {method!r}")
    if not (isinstance(source, Learner) or callable(source)): raise TypeError("source must be a Learner or a function returning one")
    parse_imports(imports)
    import pickle
    job = dict(source=source, method=method, args=args, kwargs=kwargs, sync_bn=sync_bn, ddp_kwargs=ddp_kwargs or {})
    head = pickle.dumps({'version': JOB_VERSION, 'imports': imports})   # read first: imports run before the job loads
    path = Path(path)
    _atomic_write(path, head + dumps(job, need=_need_dict(need), mode='value').data)
    return path

def load_ddp_job(path: str | os.PathLike) -> dict:
    """Load a job file after checking nobody else can have changed it; its imports run in this `__main__` first.
    The job's `digest` identifies its bytes (checkpoints record it)."""
    import pickle
    path = check_job_file(path)
    try: data = path.read_bytes()
    except OSError as e: raise JobFileError(f"cannot read job file {path}: {e.strerror or e}") from None
    f = io.BytesIO(data)
    try: head = pickle.load(f)
    except Exception as e: raise JobFileError(f"{path} is not an mpify_fastai job file ({e})") from None
    if not isinstance(head, dict) or head.get('version') != JOB_VERSION:
        raise JobFileError(f"{path} is not an mpify_fastai job file of version {JOB_VERSION}")
    run_imports(head['imports'], sys.modules['__main__'].__dict__)
    try: job = loads(f.read())
    except Exception as e: raise JobFileError(f"job file {path} is damaged: {type(e).__name__}: {e}") from None
    if not isinstance(job, dict) or 'source' not in job: raise JobFileError(f"{path} holds no mpify_fastai job")
    return {**job, 'digest': job_digest(data)}

def _merged_history(hist: dict, old: dict, done: int) -> dict:
    """The history of a resumed fit (`hist`, as `learner_result` gives it) with the `done` epochs of the checkpoint's
    history (`old`) in front: the resumed fit's rows for the skipped epochs are empty, its iteration counts restart."""
    hist = dict(hist)
    hist['values'] = list(old['values'][:done]) + list(hist['values'][done:])
    hist['losses'] = list(old['losses']) + list(hist['losses'])
    hist['lrs'] = list(old['lrs']) + list(hist['lrs'])
    off = old['iters'][done - 1] if done else 0
    hist['iters'] = list(old['iters'][:done]) + [i + off for i in hist['iters'][done:]]
    return hist

def _resume_kwargs(method: str, kwargs: dict, start_epoch: int) -> dict:
    "Keyword arguments that make `method` skip to `start_epoch`."
    kwargs = {**kwargs, 'start_epoch': start_epoch}
    if method == 'fit_flat_cos':   # fastai's fit_flat_cos accepts start_epoch but passes 0 on to fit
        from fastai.learner import SkipToEpoch
        kwargs['cbs'] = L(kwargs.get('cbs')) + [SkipToEpoch(start_epoch)]
    return kwargs

def _job_callbacks(rank: int, checkpoint: Path, resume: dict | None, digest: str):
    from fastai.callback.core import Callback
    from .learner import learner_result
    done = resume['completed_epoch'] + 1 if resume else 0

    class JobCheckpoint(Callback):
        """Rank 0 saves weights, optimizer and history at each epoch end (after the Recorder's row), atomically.
        In a resumed fit it skips the epochs it skipped, and saves the whole history (checkpointed epochs included),
        so that a second restart resumes from a complete one."""
        order = 70
        def after_epoch(self):
            if rank != 0 or self.epoch < done: return
            import torch
            res = learner_result(self.learn)
            if resume: res['recorder'] = _merged_history(res['recorder'], resume['recorder'], done)
            res['completed_epoch'], res['job_digest'] = self.epoch, digest
            buf = io.BytesIO(); torch.save(res, buf)
            _atomic_write(checkpoint, buf.getvalue())

    class ResumeHistory(Callback):
        "After a resumed fit: put the checkpointed history of the skipped epochs back in front."
        order = 51
        def after_fit(self):
            if not resume: return
            import torch
            rec = self.recorder
            hist = _merged_history({k: getattr(rec, k) for k in ('values', 'losses', 'lrs', 'iters')}, resume['recorder'], done)
            rec.values, rec.lrs, rec.iters = hist['values'], hist['lrs'], hist['iters']
            rec.losses = [x if isinstance(x, torch.Tensor) else torch.tensor(x) for x in hist['losses']]
    return [JobCheckpoint(), ResumeHistory()]

def _own_checkpoint(checkpoint: Path, job: dict) -> dict | None:
    "The checkpoint to resume from: one this very job wrote, for a schedule that can skip epochs; else None."
    import torch
    if job['method'] not in RESUMABLE or not checkpoint.exists(): return None
    ck = torch.load(checkpoint, weights_only=False)
    if ck.get('job_digest') != job['digest']:
        print(f"mpify_fastai: ignoring {checkpoint}: another job wrote it; starting from epoch 0", flush=True)
        return None
    return ck

def run_job(path: str | os.PathLike, result: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> None:
    """Worker side, one process per rank under torchrun: train the job, rank 0 writes `result` atomically.
    Resumes from `checkpoint` (default `<result>.ckpt`) when a restarted group finds one."""
    import torch, torch.distributed as dist
    from .callback import DistributedRunner
    from .ddp import TorchDDPCtx, rank_world
    from .learner import RANK0_ONLY_CALLBACKS, _is_cb, apply_result, learner_result
    import fastai.callback.schedule  # noqa: F401
    result = check_result_path(result)
    checkpoint = Path(checkpoint) if checkpoint else result.with_name(result.name + '.ckpt')
    job = load_ddp_job(path)
    with TorchDDPCtx():
        rank, world = rank_world()
        src = job['source']
        learn = src if isinstance(src, Learner) else src()
        if rank:
            learn.logger = noop
            for cb in list(learn.cbs):
                if _is_cb(cb, RANK0_ONLY_CALLBACKS): learn.remove_cb(cb)
        kwargs = dict(job['kwargs'])
        if rank and kwargs.get('cbs') is not None: kwargs['cbs'] = [cb for cb in L(kwargs['cbs']) if not _is_cb(cb, RANK0_ONLY_CALLBACKS)]
        state = [_own_checkpoint(checkpoint, job) if rank == 0 else None]
        if world > 1: dist.broadcast_object_list(state, 0)
        resume = state[0]
        if resume is not None:
            apply_result(learn, resume)
            kwargs = _resume_kwargs(job['method'], kwargs, resume['completed_epoch'] + 1)
            if rank == 0: print(f"mpify_fastai: resuming from {checkpoint} after epoch {resume['completed_epoch']}", flush=True)
        cbs = [DistributedRunner(sync_bn=job['sync_bn'], **job['ddp_kwargs'])] + _job_callbacks(rank, checkpoint, resume, job['digest'])
        with learn.added_cbs(cbs): getattr(learn, job['method'])(*job['args'], **kwargs)
        if rank == 0:
            buf = io.BytesIO(); torch.save(learner_result(learn), buf)
            _atomic_write(result, buf.getvalue())
            checkpoint.unlink(missing_ok=True)
        if world > 1: dist.barrier()

@patch
def save_ddp_job(self: Learner, path: str | os.PathLike, *args, method: str = 'fit', factory: Callable | None = None,
                 **kwargs) -> Path:
    "Save `method(*args, **kwargs)` on this Learner (or on `factory()`) as a job for `torchrun -m mpify_fastai run`."
    return save_job(factory or self, path, *args, method=method, **kwargs)

@patch
def load_ddp_result(self: Learner, path: str | os.PathLike) -> None:
    "Apply a result written by `python -m mpify_fastai run` (weights, history, optimizer state), as `fit_ddp` does."
    import torch
    from .learner import apply_result
    apply_result(self, torch.load(path, weights_only=False))
