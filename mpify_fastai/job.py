"""Multi-node bridge: save the notebook's training as a job file, run it under torchrun, load the result back.

`learn.save_ddp_job("job.pkl", 10, lr=1e-3, method="fine_tune")` writes the Learner as a pickle (tensors by value,
notebook code and what it references included; files its data reads, such as images, stay paths that every node needs);
`torchrun ... -m mpify_fastai run job.pkl --result result.pth` trains it with the same `DistributedRunner` as `fit_ddp`;
`learn.load_ddp_result("result.pth")` applies it. Rank 0 checkpoints every epoch, so a group restarted by torchrun goes on
from the epochs done (`fine_tune`: from the start); one restarted after the result was written finds it (the job's digest
is in it) and trains nothing.
A job file is a pickle: loading it runs code. Only run job files you made; the runner refuses one that
others can write to.
"""
from __future__ import annotations
import io, os, pickle, sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from fastai.learner import Learner
from fastcore.basics import patch
from .errors import ArgumentError, ArgumentTypeError, surfaces_errors
from .files import atomic_move, atomic_write
from .group import TorchDDPCtx, rank_world
from .imports import run_imports
from .jobfile import JobFileError, check_job_file, check_result_path, job_digest
from .launch import LaunchOptions
from .progress import EventLog, FitResumed, ProgressEvents, epochs_done
from .recovery import resumable_checkpoint, resume_callbacks
from .serialize import dumps, loads
from .state import apply_result
from .training import DRAWN_BY_CALLER, SCHEDULES, DDPJob, DDPOptions, call_arguments, fit_distributed, worker_learner

__all__ = ['save_job', 'load_ddp_job', 'run_job', 'holds_result', 'RunFinished']

JOB_VERSION = 2   # 2: the job is a `DDPJob` record

def save_job(job: DDPJob, path: str | os.PathLike, need: str = '', imports: str = '') -> Path:
    "Write `job` as a job file (mode 0600; data files it reads stay paths), the `imports` it needs read first."
    options = LaunchOptions(need=need, imports=imports)   # checks both
    head = pickle.dumps({'version': JOB_VERSION, 'imports': imports})   # read first: imports run before the job loads
    data = dumps(job, need=options.need_globals, mode='value').data
    return atomic_write(Path(path), lambda f: (f.write(head), f.write(data)))

def load_ddp_job(path: str | os.PathLike) -> tuple[DDPJob, str]:
    """Load a job file after checking nobody else can have changed it; its imports run in this `__main__` first.
    Returns the job and the digest of its bytes (checkpoints record it)."""
    path = check_job_file(path)
    try: data = path.read_bytes()
    except OSError as e: raise JobFileError(f"cannot read job file {path}: {e.strerror or e}") from None
    f = io.BytesIO(data)
    try: head = pickle.load(f)
    except Exception as e: raise JobFileError(f"{path} is not an mpify_fastai job file ({e})") from None
    if not isinstance(head, dict) or head.get('version') != JOB_VERSION:
        raise JobFileError(f"{path} is not an mpify_fastai job file of version {JOB_VERSION} (save it again with this version)")
    run_imports(head['imports'], sys.modules['__main__'].__dict__)
    try: job = loads(f.read())
    except Exception as e: raise JobFileError(f"job file {path} is damaged: {type(e).__name__}: {e}") from None
    if not isinstance(job, DDPJob): raise JobFileError(f"{path} holds no mpify_fastai job")
    return job, job_digest(data)

@dataclass(frozen=True)
class RunFinished:
    "A restarted or requeued attempt (`attempt`) found its job's result written: it trained and wrote nothing."
    attempt: int

def holds_result(result: Path, digest: str) -> bool:
    "Whether `result` holds the result of the job `digest`; one left there by another job is said to be replaced."
    import torch
    if not result.exists(): return False
    try: found = torch.load(result, weights_only=False, mmap=True).get('job_digest')
    except Exception: found = None
    if found == digest: return True
    print(f"mpify_fastai: {result} holds another job's result; this job's will replace it", flush=True)
    return False

def _start(result: Path, checkpoint: Path, method: str, digest: str) -> tuple[str | None, dict | None]:
    """Rank 0's view of a start: 'result' (this job's is written), 'checkpoint' (its finished state is, not yet moved into
    place) or None, and the checkpoint to resume from."""
    if holds_result(result, digest): return 'result', None
    ck = resumable_checkpoint(checkpoint, method, digest)
    return ('checkpoint', None) if ck is not None and ck.get('finished') else (None, ck)

def run_job(path: str | os.PathLike, result: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
            events: str | os.PathLike | None = None, attempt: int = 0) -> None:
    """Worker side, one process per rank (under torchrun, or a SLURM job's tasks): train the job, rank 0 writes `result`
    atomically. Resumes from `checkpoint` (default `<result>.ckpt`) when a restarted group finds one; a group that finds
    this job's result (or its finished checkpoint) written trains nothing and leaves it as it is. With `events`, rank 0
    appends its progress there (`EventLog`) for the caller's table instead of printing it."""
    import torch.distributed as dist
    result = check_result_path(result)
    checkpoint = Path(checkpoint) if checkpoint else result.with_name(result.name + '.ckpt')
    job, digest = load_ddp_job(path)
    with TorchDDPCtx():
        rank, world = rank_world()
        state = [_start(result, checkpoint, job.method, digest) if rank == 0 else None]
        if world > 1: dist.broadcast_object_list(state, 0)
        done, resumed = state[0]
        log = EventLog(events) if events and rank == 0 else None
        if done and rank == 0:
            how = (f"{result} holds its result; nothing is trained or written (to train it again, remove {result})"
                   if done == 'result' else
                   f"its final checkpoint {checkpoint} becomes {result}; nothing is trained")
            print(f"mpify_fastai: this job already finished: {how}", flush=True)
            if log: log.append(RunFinished(attempt))
        if not done:
            learn, kwargs = worker_learner(job.source, job.kwargs, rank0_drops=DRAWN_BY_CALLER if events else ())
            if resumed is not None and rank == 0:
                k = resumed['completed_epoch'] + 1
                print(f"mpify_fastai: resuming from {checkpoint} with {epochs_done(k, resumed['n_epoch'])}: training "
                      f"from epoch {k}", flush=True)
            if log and (resumed is not None or attempt):   # a requeue before any epoch was checkpointed starts at 0
                log.append(FitResumed(resumed['completed_epoch'] + 1 if resumed else 0, attempt))
            kwargs, cbs = resume_callbacks(learn, job.method, kwargs, checkpoint, resumed, job.history, job_digest=digest)
            lead = [ProgressEvents(log.append)] if log else []
            fit_distributed(learn, job.method, job.args, kwargs, job.ddp, cbs=cbs + lead, lead=lead)
        if rank == 0 and done != 'result': atomic_move(checkpoint, result)   # the finished checkpoint is the result
        if world > 1: dist.barrier()

@patch
@surfaces_errors
def save_ddp_job(self: Learner, path: str | os.PathLike, *args, method: str = 'fit', factory: Callable | None = None,
                 need: str = '', imports: str = '', sync_bn: bool = True, ddp_kwargs: dict | None = None,
                 split_batches: bool = False, **kwargs) -> Path:
    """Save `method(*args, **kwargs)` on this Learner (or on `factory()`) as a job for `torchrun -m mpify_fastai run`;
    `need`/`imports`, `sync_bn`/`ddp_kwargs`/`split_batches` as for `fit_ddp`."""
    if method not in SCHEDULES: raise ArgumentError(f"method must be one of {SCHEDULES}, got {method!r}")
    if factory is not None and not callable(factory):
        raise ArgumentTypeError("factory must be a zero-argument function that returns a Learner")
    call_arguments(method, args, kwargs)
    ddp = DDPOptions(sync_bn, ddp_kwargs, split_batches)
    return save_job(DDPJob(factory or self, method, args, kwargs, ddp), path, need, imports)

@patch
def load_ddp_result(self: Learner, path: str | os.PathLike) -> None:
    "Apply a result written by `python -m mpify_fastai run` (weights, history, optimizer state), as `fit_ddp` does."
    import torch
    apply_result(self, torch.load(path, weights_only=False))
