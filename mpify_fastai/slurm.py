"""A DDP fit as one SLURM job, submitted with submitit: `learn.ddp(executor=ex).fit_one_cycle(10, 1e-3)`.

The job's folder holds everything it needs: the job file (`save_job`, mode 0600) and a record of the run. Each SLURM task
is one rank (`TorchDistributedEnvironment`) and trains with the torchrun path's `run_job`; rank 0 appends its progress to
an `EventLog` there, which the caller tails into the same table as `fit_ddp`, and writes the result, which the caller
applies with `apply_result`. Each epoch is checkpointed: a requeued job (preemption, time limit through submitit's
checkpoint protocol, `scontrol requeue`) goes on from the last completed one; one requeued after the result was written
finds it and exits without training or writing anything. `wait=False` gives a `SlurmRun` at once;
`attach(folder, learn)` finds it again after a kernel restart.
"""
from __future__ import annotations
import json, os, signal, socket, time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from fastai.learner import Learner
from fastcore.foundation import L
from .errors import ArgumentError, LaunchError, WorkerError, surfaces_errors, user_traceback
from .files import atomic_write
from .group import peer_failure
from .job import RunFinished, run_job, save_job
from .progress import EventLog, FitResumed, ProgressDisplay, epochs_done
from .recovery import keep_checkpoint, last_checkpoint, stopped_at_checkpoint
from .state import apply_result
from .training import SHOW_GRAPH, DDPJob, is_callback_of

__all__ = ['FINAL_STATES', 'SlurmRun', 'SlurmRunInfo', 'SlurmTask', 'TaskFailure', 'submit_job', 'attach']

JOB, RESULT, EVENTS, INFO = 'job.pkl', 'result.pth', 'events.log', 'run.json'
_POLL, _STATE_EVERY, _CANCEL_WAIT = 0.2, 2.0, 15.0
_TERM_WAIT = 0.5   # seconds a failing rank waits for SLURM's SIGTERM: its DataLoader workers may have died of it first
_REQUEUED = ('REQUEUED', 'REQUEUE_FED', 'REQUEUE_HOLD', 'PENDING')   # a job with a result in one of these was requeued
FINAL_STATES = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'BOOT_FAIL', 'DEADLINE')

def _submitit():
    try: import submitit
    except ImportError: raise ArgumentError('executor= needs submitit: pip install submitit (or pip install -e ".[slurm]")') from None
    return submitit

# ---------------------------------------------------------------- records in the job's folder

@dataclass
class SlurmRunInfo:
    "What finds a run again from its folder (`run.json`): the SLURM job, its submitit folder and task count, the call."
    job_id: str
    submitit_folder: str
    tasks: int
    method: str
    args: list
    graph: bool = False   # the loss graph of `ShowGraphCallback` under the table

@dataclass
class TaskFailure:
    "A rank's exception, written by its task to `failure-<rank>.json` for the caller's `WorkerError`."
    rank: int
    exc_type: str
    message: str
    traceback: str
    peer: bool       # a collective failed because another rank went away: not the root cause

# ---------------------------------------------------------------- inside the job: each task is a rank

def _export_rank_env() -> int:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM (submitit's `TorchDistributedEnvironment`; where the
    first node's name does not resolve, the address srun was launched from), torch threads from the task's CPUs."""
    from submitit.helpers import TorchDistributedEnvironment
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    try: socket.getaddrinfo(env.master_addr, None)
    except OSError: os.environ['MASTER_ADDR'] = os.environ.get('SLURM_LAUNCH_NODE_IPADDR', '127.0.0.1')
    if 'OMP_NUM_THREADS' not in os.environ and os.environ.get('SLURM_CPUS_PER_TASK'):   # the task's CPUs, not the node's
        os.environ['MPIFY_THREADS'] = os.environ['SLURM_CPUS_PER_TASK']
    import torch
    if torch.cuda.is_available(): os.environ['MPIFY_DEVICE'] = str(env.local_rank % torch.cuda.device_count())
    return env.rank

class StopSignal:
    """Notes SLURM's SIGTERM to this task (a requeue, a preemption, a cancel), then hands it to the handler that was there
    (submitit's, which lets the task run on until the SIGKILL)."""
    def __init__(self):
        self.seen, self.previous = False, signal.getsignal(signal.SIGTERM) or signal.SIG_DFL
        signal.signal(signal.SIGTERM, self._on_term)
    def _on_term(self, signum, frame):
        self.seen = True
        if callable(self.previous): return self.previous(signum, frame)
        signal.signal(signal.SIGTERM, self.previous)   # the default: end as SLURM meant
        os.kill(os.getpid(), signum)
    def within(self, seconds: float) -> bool:
        "Whether SIGTERM came, or comes within `seconds`."
        deadline = time.monotonic() + seconds
        while not self.seen and time.monotonic() < deadline: time.sleep(0.05)
        return self.seen

@dataclass
class SlurmTask:
    """The function a SLURM job's tasks run: train the job file in `folder` as one rank. submitit's checkpoint protocol
    (`checkpoint`) requeues it as it is on preemption or time-out: its state is the folder's epoch checkpoint."""
    folder: str
    def __call__(self) -> None:
        rank, folder, stop = _export_rank_env(), Path(self.folder), StopSignal()
        (folder / f'failure-{rank}.json').unlink(missing_ok=True)   # an earlier attempt's, before a requeue
        try: run_job(folder / JOB, folder / RESULT, events=folder / EVENTS, attempt=int(os.environ.get('SLURM_RESTART_COUNT', 0)))
        except Exception as e:   # not SystemExit: submitit's exit after it requeued the job is no failure
            if stop.within(_TERM_WAIT):   # SLURM stops the job (requeue, preemption, cancel): not the run's failure
                print(f"mpify_fastai: rank {rank} stopped by SLURM's SIGTERM ({type(e).__name__}: {e})", flush=True)
                raise
            rec = TaskFailure(rank, type(e).__qualname__, str(e), user_traceback(e), peer_failure(e))
            atomic_write(folder / f'failure-{rank}.json', lambda f: f.write(json.dumps(asdict(rec)).encode()))
            raise
    def checkpoint(self, *args, **kwargs):
        "Requeue as is: a requeued job resumes from the last completed epoch."
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)

# ---------------------------------------------------------------- the caller's side

class SlurmRun:
    """A DDP fit running as a SLURM job: `progress()` draws its table so far, `wait()` blocks and applies the result to
    the Learner, `cancel()` stops it; `folder` finds it again (`attach`)."""
    def __init__(self, learn: Learner, folder: str | os.PathLike, job=None):
        self.learn, self.folder = learn, Path(folder)
        self.info = SlurmRunInfo(**json.loads((self.folder / INFO).read_text()))
        self.job = job or _submitit().SlurmJob(self.info.submitit_folder, self.info.job_id, tasks=tuple(range(self.info.tasks)))
        self.applied = False

    def __repr__(self): return f"SlurmRun(job {self.info.job_id}, {self.state}, folder {str(self.folder)!r})"
    @property
    def job_id(self) -> str: return self.info.job_id
    @property
    def state(self) -> str:
        "The job's SLURM state now (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED...), from `sacct` as submitit reads it."
        return (self.job.get_info(mode='force').get('State') or 'UNKNOWN').split()[0]
    @property
    def checkpoint(self) -> Path: return self.folder / (RESULT + '.ckpt')

    def done(self) -> bool:
        "Whether the job has ended (a result written, or SLURM has it in a final state)."
        return (self.folder / RESULT).exists() or self.state in FINAL_STATES

    def progress(self) -> None:
        "Draw the job's table so far (every row of its finished epochs)."
        display = ProgressDisplay(self.info.graph)
        try: self._draw(EventLog(self.folder / EVENTS), display)
        finally: display.close()

    def cancel(self) -> None:
        "Cancel the job (scancel) and wait until SLURM has it stopped; the Learner is left as it is."
        self.job.cancel(check=False)
        deadline = time.monotonic() + _CANCEL_WAIT
        while time.monotonic() < deadline and self.state not in FINAL_STATES: time.sleep(0.5)

    @surfaces_errors
    def wait(self, progress: bool = True) -> None:
        """Block until the job ends, drawing its table; then apply rank 0's result to the Learner, as `fit_ddp` does.
        A failed job raises `WorkerError` (rank, traceback); Ctrl-C cancels it and keeps the last completed epoch."""
        if self.applied: return
        display, log, check = ProgressDisplay(self.info.graph), EventLog(self.folder / EVENTS), 0.
        try:
            while not (self.folder / RESULT).exists():
                if progress: self._draw(log, display)
                if any(not f.peer for f in self._failures()):   # a rank's own error: stop the others now, as fit_ddp does
                    self.cancel(); break
                if time.monotonic() >= check:
                    if (state := self.state) in FINAL_STATES: break
                    if state == 'PENDING' and check == 0.: print(f"mpify_fastai: SLURM job {self.job_id} waits in the queue", flush=True)
                    check = time.monotonic() + _STATE_EVERY
                time.sleep(_POLL)
            if progress: self._draw(log, display)
        except KeyboardInterrupt:
            display.close()
            self.cancel()
            if not self._apply_result():
                stopped_at_checkpoint(self.learn, last_checkpoint(str(self.checkpoint)), self.info.method, tuple(self.info.args))
            raise
        finally: display.close()
        if not self._apply_result(): raise self._failure()
        if self.state in _REQUEUED:
            print(f"mpify_fastai: SLURM job {self.job_id} was requeued as it ended; its result is applied, and when SLURM "
                  "starts it again it finds the result and exits without training", flush=True)

    def _apply_result(self) -> bool:
        import torch
        if not (res := self.folder / RESULT).exists(): return False
        apply_result(self.learn, torch.load(res, weights_only=False))
        self.applied = True
        return True

    def _draw(self, log: EventLog, display: ProgressDisplay) -> None:
        for ev in log.read():
            if isinstance(ev, FitResumed):
                display.restarting(f"mpify_fastai: SLURM job {self.job_id} was requeued (restart {ev.attempt}), with "
                                   f"{epochs_done(ev.epoch, display.n_epoch)}: training from epoch {ev.epoch}", ev.epoch)
            elif isinstance(ev, RunFinished):
                display.restarting(f"mpify_fastai: SLURM job {self.job_id} was started again (restart {ev.attempt}) after "
                                   "it had written its result: it trained nothing and left the result as it was", 0)
            else: display(0, ev)

    def _failures(self) -> list[TaskFailure]:
        return [TaskFailure(**json.loads(p.read_text())) for p in self.folder.glob('failure-*.json')]

    def _failure(self) -> LaunchError:
        "The error of a job that ended without a result: the root-cause rank's exception, else what SLURM says."
        if fails := sorted(self._failures(), key=lambda f: (f.peer, f.rank)):
            f = fails[0]
            e = WorkerError(f.rank, f.exc_type, f.message, f.traceback)
        else:
            logs = sorted(Path(self.info.submitit_folder).glob(f'{self.job_id}_*_log.err'))
            tail = '\n'.join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs)
            e = LaunchError(f"SLURM job {self.job_id} ended {self.state} without a result; its logs:\n{tail or '(none)'}")
        keep_checkpoint(e, str(self.checkpoint))
        return e

def _run_folder(executor) -> Path:
    base = Path(str(executor.folder).split('%j')[0])
    base.mkdir(parents=True, exist_ok=True)
    folder = base / f"mpify-{datetime.now():%Y%m%d-%H%M%S}-{os.urandom(2).hex()}"
    folder.mkdir(mode=0o700)
    return folder

def submit_job(learn: Learner, job: DDPJob, executor, wait: bool = True, need: str = '', imports: str = '') -> SlurmRun | None:
    """Submit the fit `job` through the submitit `executor` (its tasks are the ranks) and, with `wait`, follow it and apply
    its result to `learn`; else return its `SlurmRun` at once."""
    submitit = _submitit()
    cluster = executor.cluster if isinstance(executor, submitit.AutoExecutor) else type(executor).__name__
    if cluster not in ('slurm', 'SlurmExecutor'):
        raise ArgumentError(f"executor must be a submitit executor for SLURM (submitit.AutoExecutor(folder=...) on a host with "
                            f"sbatch, or submitit.SlurmExecutor), got {cluster}")
    folder = _run_folder(executor)
    save_job(job, folder / JOB, need, imports)
    sub = executor.submit(SlurmTask(str(folder.resolve())))
    graph = any(is_callback_of(cb, (SHOW_GRAPH,)) for cb in L(learn.cbs) + L(job.kwargs.get('cbs')))
    info = SlurmRunInfo(str(sub.job_id), str(sub.paths.folder), sub.num_tasks, job.method, list(job.args), graph)
    (folder / INFO).write_text(json.dumps(asdict(info), default=repr))
    print(f"mpify_fastai: submitted SLURM job {info.job_id} ({info.tasks} ranks); its folder is {folder}" +
          ('' if wait else f"\n  reattach after a restart: mpify_fastai.attach({str(folder)!r}, learn)"), flush=True)
    run = SlurmRun(learn, folder, sub)
    if not wait: return run
    run.wait(progress=job.progress)

@surfaces_errors
def attach(folder: str | os.PathLike, learn: Learner) -> SlurmRun:
    """The `SlurmRun` of a job submitted with `learn.ddp(executor=..., wait=False)`, found from its folder (a run's own, or
    the executor's: its latest run) after a kernel restart; `.wait()` applies its result to `learn`."""
    folder = Path(folder)
    if not (folder / INFO).exists():
        runs = sorted(folder.glob(f'mpify-*/{INFO}'))
        if not runs: raise ArgumentError(f"{folder} holds no mpify_fastai SLURM run (no {INFO}, nor mpify-*/{INFO})")
        folder = runs[-1].parent
    return SlurmRun(learn, folder)
