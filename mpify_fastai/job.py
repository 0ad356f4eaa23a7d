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
from fastcore.basics import patch
from .group import TorchDDPCtx, rank_world
from .files import atomic_write
from .imports import parse_imports, run_imports
from .jobfile import JobFileError, check_job_file, check_result_path, job_digest
from .launch import need_globals
from .serialize import dumps, loads
from .training import (RESUMABLE, SCHEDULES, apply_result, fit_distributed, learner_result, resume_callbacks,
                       worker_learner)

__all__ = ['save_job', 'load_ddp_job', 'run_job', 'resumable_checkpoint']

JOB_VERSION = 1

def save_job(source: Learner | Callable[[], Learner], path: str | os.PathLike, *args, method: str = 'fit',
                 need: str = '', imports: str = '', sync_bn: bool = True, ddp_kwargs: dict | None = None, **kwargs) -> Path:
    "Write a self-contained, portable training job: `method(*args, **kwargs)` on `source` (a Learner or factory)."
    if method not in SCHEDULES: raise ValueError(f"method must be one of {SCHEDULES}, got {method!r}")
    if not (isinstance(source, Learner) or callable(source)): raise TypeError("source must be a Learner or a function returning one")
    parse_imports(imports)
    import pickle
    job = dict(source=source, method=method, args=args, kwargs=kwargs, sync_bn=sync_bn, ddp_kwargs=ddp_kwargs or {})
    head = pickle.dumps({'version': JOB_VERSION, 'imports': imports})   # read first: imports run before the job loads
    path = Path(path)
    data = dumps(job, need=need_globals(need), mode='value').data
    atomic_write(path, lambda f: (f.write(head), f.write(data)))
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

def resumable_checkpoint(checkpoint: Path, job: dict) -> dict | None:
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
    result = check_result_path(result)
    checkpoint = Path(checkpoint) if checkpoint else result.with_name(result.name + '.ckpt')
    job = load_ddp_job(path)
    with TorchDDPCtx():
        rank, world = rank_world()
        learn, kwargs = worker_learner(job['source'], job['kwargs'])
        state = [resumable_checkpoint(checkpoint, job) if rank == 0 else None]
        if world > 1: dist.broadcast_object_list(state, 0)
        resumed = state[0]
        if resumed is not None and rank == 0:
            print(f"mpify_fastai: resuming from {checkpoint} after epoch {resumed['completed_epoch']}", flush=True)
        kwargs, cbs = resume_callbacks(learn, job['method'], kwargs, checkpoint, resumed, job_digest=job['digest'])
        fit_distributed(learn, job['method'], job['args'], kwargs, job['sync_bn'], job['ddp_kwargs'], cbs=cbs)
        if rank == 0:
            atomic_write(result, lambda f: torch.save(learner_result(learn), f))
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
    apply_result(self, torch.load(path, weights_only=False))
