"""The caller's side of a launch: `ranch` runs a notebook function on N fresh processes and gathers results.

Arguments are checked, then the call is serialized once into files with no name (in /dev/shm) that every worker reads
and that vanish with the last process holding them, however the caller dies (the
worker's side is `worker.py`). The caller waits on pipes and process sentinels together, so a dead worker is noticed at once, and
stops every worker on the first failure, timeout or interrupt. Workers die with the caller (parent-death
signal plus a pipe watchdog), so a restarted kernel never finds yesterday's workers still running.
"""
from __future__ import annotations
import errno, inspect, os, random, signal, sys, tempfile, time
from contextlib import ExitStack
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence
import multiprocess as mp
from multiprocess.connection import wait
from ._private import in_spawn_bootstrap, main_not_rerun
from .errors import (ArgumentError, ArgumentTypeError, LaunchTimeout, MainGuardError, NeedError, PayloadError, WorkerDied,
                     WorkerError, surfaces_errors)
from .files import AnonymousFile, shm_root, sweep_torch_shm
from .imports import parse_imports
from .procfs import process_group_members
from .serialize import Payload, check_call, dumps, loads
from .warm import mark_ready, prewarm, warm_context, warm_ready
from .worker import (STACKS_SIGNAL, Ack, Call, Event, Failure, Output, Result, WorkerSpec, run_in_context,
                     worker_main)

__all__ = ['ranch', 'launch', 'OptionRecord', 'LaunchOptions', 'with_options', 'check_nprocs', 'check_fn', 'check_caller_rank',
           'gather_mode', 'context_manager', 'START_METHODS', 'OUTPUT_MODES']

START_METHODS = ('warm', 'spawn', 'fork', 'forkserver')   # 'warm': fork server with torch/fastai preloaded (warm.py)
OUTPUT_MODES = ('rank0', 'all', 'none')
_STOP_GRACE = 1.0         # seconds between SIGTERM and SIGKILL when stopping workers

# ---------------------------------------------------------------- options and checks, before anything starts

def _need_globals(need: str | Sequence[str]) -> dict:
    "The notebook (`__main__`) globals named in `need` (\"a b\" or a list), name -> value."
    names = need.replace(',', ' ').split() if isinstance(need, str) else list(need)
    main = sys.modules['__main__'].__dict__
    missing = [n for n in names if n not in main]
    if missing:
        raise NeedError(f"need names {', '.join(map(repr, missing))}, which {'is' if len(missing) == 1 else 'are'} "
                        "not defined in __main__ (the notebook or script); define it first or fix the spelling")
    return {n: main[n] for n in names}

class OptionRecord:
    "Base of the option records (dataclasses): each is made, and checked, from an entry point's keyword arguments."
    @classmethod
    def take(cls, kwargs: dict):
        "The record made from the keyword arguments in `kwargs` that name its fields; those are removed from `kwargs`."
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})

@dataclass(frozen=True)
class LaunchOptions(OptionRecord):
    """How every launch runs (`ranch`, `in_torchddp`, `fit_ddp`, `learn.ddp`), checked once, when made.
    `need`: notebook globals to ship ("a b"); `imports`: import statements run in each worker first; `start_method`:
    'warm' (fork from a per-session server with torch/fastai imported), 'spawn', 'fork' or 'forkserver'; `timeout`:
    seconds before every worker is stopped; `output`: whose prints reach you, 'rank0' (and every rank's stderr), 'all'
    or 'none'."""
    need: str | Sequence[str] = ''
    imports: str = ''
    start_method: str = 'warm'
    timeout: float | None = None
    output: str = 'rank0'

    def __post_init__(self):
        if self.start_method not in START_METHODS:
            raise ArgumentError(f"start_method must be one of {START_METHODS}, got {self.start_method!r}")
        if self.output not in OUTPUT_MODES: raise ArgumentError(f"output must be one of {OUTPUT_MODES}, got {self.output!r}")
        t = self.timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
            raise ArgumentError(f"timeout must be a positive number of seconds or None, got {t!r}")
        parse_imports(self.imports)
        _need_globals(self.need)

    @property
    def need_globals(self) -> dict: return _need_globals(self.need)

def with_options(*records: type) -> Callable:
    """Show the fields of option records (dataclasses, such as `LaunchOptions`) in the decorated function's signature,
    keyword-only before its `**kwargs`, so that `help()`, Tab and Shift-Tab list options declared once, in the record."""
    def show(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        rest = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                 for r in records for f in fields(r) if f.name not in sig.parameters]
        fn.__signature__ = sig.replace(parameters=own + added + rest)
        return fn
    return show

def check_nprocs(nprocs) -> int:
    "`nprocs` as an int, or an error naming it."
    if isinstance(nprocs, bool) or not hasattr(nprocs, '__index__') or int(nprocs) < 1:
        raise ArgumentError(f"nprocs must be a positive int, got {nprocs!r}")
    return int(nprocs)

def check_fn(fn) -> Callable:
    if not callable(fn): raise ArgumentTypeError(f"fn must be callable, got {type(fn).__name__}")
    return fn

def check_caller_rank(caller_rank) -> None:
    "mpify let the caller run a rank itself; here every rank runs in a worker, so only `caller_rank=None` is accepted."
    if caller_rank is not None:
        raise ArgumentError(f"caller_rank={caller_rank!r}: the caller never runs a rank here, so that it never joins a process "
                            "group or touches a GPU and can always stop the workers. Every rank runs in a worker and its "
                            "result comes back: drop caller_rank, and use gather=0 for rank 0's result (default: every "
                            "rank's, in order)")

def gather_mode(gather, nprocs: int):
    "`gather` as `launch` uses it: 'all', None or a rank. mpify's True and False mean 'all' and None: the caller takes no rank."
    if gather is True or gather is False: return 'all' if gather else None
    if gather is None or gather == 'all': return gather
    if not isinstance(gather, int) or not 0 <= gather < nprocs:
        raise ArgumentError(f"gather must be 'all' (or True), None (or False) or a rank in 0..{nprocs-1}, got {gather!r}")
    return gather

def context_manager(ctx):
    "`ctx` checked before launch: a context manager, or a zero-argument callable returning one (a class planning launches is made here)."
    if ctx is None: return None
    if isinstance(ctx, type) and hasattr(ctx, 'launch_env'): return ctx()
    if inspect.isgenerator(getattr(ctx, 'gen', None)):
        raise ArgumentTypeError("ctx is a running @contextmanager generator, which cannot be sent to other processes: pass "
                                "the function itself (ctx=my_context, not ctx=my_context())")
    if (hasattr(ctx, '__enter__') and hasattr(ctx, '__exit__')) or callable(ctx): return ctx
    raise ArgumentTypeError(f"ctx must be a context manager, or a zero-argument function returning one; got {type(ctx).__name__}")

def _caller_seed() -> int:
    """A seed for the workers' RNGs drawn from the caller's own (torch's where loaded, as fastai's `set_seed` seeds it, else
    Python's): each call draws anew, and a seed set in the notebook makes the workers' draws repeat."""
    torch = sys.modules.get('torch')
    return int(torch.randint(0, 2**62, ())) if torch is not None else random.getrandbits(62)

# ---------------------------------------------------------------- starting, supervising and stopping workers

def _context(start_method: str, light: bool):
    """The multiprocess context to start workers from. Under 'warm', a light call (its payload needs neither torch nor
    fastai) made while the server is still starting runs on spawn rather than wait for the server's imports."""
    if start_method != 'warm': return mp.get_context(start_method)
    if light and not warm_ready() and prewarm() is not None: return mp.get_context('spawn')
    return warm_context()

def _report_stacks(e: BaseException, procs: list, stacks: list[AnonymousFile], wait: float = 2.0):
    """Where every live rank was when a launch timed out, a rank's collective timed out, or an interrupt found a rank
    that did not stop within the grace: their Python stacks, in the error's message (`e.stacks` too) or printed."""
    failed = e.rank if isinstance(e, WorkerError) else None   # it told its own story; it is exiting
    live = {r: p for r, p in enumerate(procs) if p.exitcode is None and r != failed}
    for p in live.values():
        try: os.kill(p.pid, STACKS_SIGNAL)
        except ProcessLookupError: pass
    files = {r: stacks[r] for r in live}
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not all(f.read() for f in files.values()): time.sleep(0.05)
    time.sleep(0.1)   # let the last lines land
    def read(f): return f.read().decode(errors='replace').strip() or '(no stack: the rank did not answer)'
    e.stacks = '\n\n'.join(f"--- where rank {r} was ---\n{read(f)}" for r, f in files.items())
    if not e.stacks: return
    if isinstance(e, (LaunchTimeout, WorkerError)): e.args = (f"{e.args[0]}\n\n{e.stacks}",)
    else: print(f"mpify_fastai: interrupted; a rank did not stop within {_STOP_GRACE} s; where each was:\n{e.stacks}",
                file=sys.stderr, flush=True)

def _stop_workers(procs: list, on_stuck: Callable[[], None] | None = None):
    """Stop every worker and everything it started: SIGTERM, a short grace, SIGKILL; reap them all. `on_stuck()` runs
    before the SIGKILL when a worker is still alive after the grace."""
    alive = [p for p in procs if p.exitcode is None]
    for p in alive:
        try: os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            try: p.terminate()
            except Exception: pass
    deadline = time.monotonic() + _STOP_GRACE
    for p in alive: p.join(max(0, deadline - time.monotonic()))
    if on_stuck is not None and any(p.exitcode is None for p in procs): on_stuck()
    for p in procs:
        for pid in process_group_members(p.pid):
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        if p.exitcode is None:
            p.kill(); p.join()

class _Collector:
    "What comes back from the workers of one launch: output and events passed on, results, the first failure."
    def __init__(self, nprocs: int, on_output: Callable, on_event: Callable | None):
        self.n,self.on_output,self.on_event = nprocs,on_output,on_event
        self.results,self.failure = {},None

    def handle(self, rank: int, conn, msg: Output | Event | Result | Failure):
        match msg:
            case Output(stream, text): self.on_output(rank, stream, text)
            case Event(data):
                if self.on_event is not None: self.on_event(rank, *data)
            case Result(payload):
                self.results[rank] = None if payload is None else loads(payload, install_globals=False)
                conn.send(Ack())
            case Failure() if self.failure is None:
                err = WorkerError(rank, msg.exc_type, msg.message, msg.traceback)
                err.__cause__ = _unpickled(msg.pickled)
                self.failure = err

def _unpickled(data: bytes | None) -> BaseException | None:
    "A worker's exception as it raised it, where it unpickles here."
    if data is None: return None
    try:
        import dill
        return dill.loads(data)
    except Exception: return None

def _default_output(mode: str) -> Callable:
    def show(rank: int, stream: str, text: str):
        if mode == 'none' or (mode == 'rank0' and rank != 0 and stream == 'stdout'): return
        prefix = '' if rank == 0 else f'[rank {rank}] '
        print('\n'.join(prefix + line for line in text.split('\n')), file=sys.stderr if stream == 'stderr' else sys.stdout,
              flush=True)
    return show

def _ship(call: Call, need: dict, arg_names: dict | None) -> Payload:
    """`call` serialized once for every worker, its large buffers in a file with no name in /dev/shm (in the temp
    folder where /dev/shm is full); a `PayloadError` naming what cannot be sent."""
    try:
        try: return dumps(call, need=need, segment_dir=shm_root())
        except OSError as e:
            if e.errno != errno.ENOSPC: raise
        disk = tempfile.gettempdir()
        print(f"mpify_fastai: {shm_root()} has no room for this call's data; it goes through {disk} on disk "
              "(slower to start). Docker: --shm-size=8g gives it room", file=sys.stderr, flush=True)
        return dumps(call, need=need, segment_dir=disk)
    except (OSError, KeyboardInterrupt): raise
    except Exception as e:
        check_call(call.fn, call.args, call.kwargs, need, arg_names)
        raise PayloadError(f"cannot send the call to the workers: {type(e).__name__}: {e}") from None

def launch(nprocs: int, fn: Callable, args: tuple = (), kwargs: dict | None = None,
           options: LaunchOptions = LaunchOptions(), *, gather='all', ctx=None, env: dict | Callable[[int], dict] | None = None,
           on_event: Callable | None = None, on_output: Callable | None = None, context=None,
           arg_names: dict[str, Any] | None = None) -> Any:
    """The one engine behind `ranch`, `in_torchddp`, `fit_ddp` and `learn.ddp`: run `fn(*args, **kwargs)` on `nprocs` new
    processes under `options` and gather results (`gather`: 'all', a rank or None). Its callers have checked their
    arguments. `ctx` (a context manager, or a zero-argument callable returning one) is entered around `fn` in every
    worker; one that plans launches (`TorchDDPCtx`) gives the workers their environment through `launch_env(nprocs)`.
    `env` adds variables to each worker (a dict, or rank -> dict); `on_event(rank, *data)` receives what workers send
    with `send_event`; `context` is a multiprocess context to start workers from (default: `options.start_method`);
    `arg_names` (name -> argument) gives the names a payload error starts its path from, e.g. {'learn': learn}."""
    if in_spawn_bootstrap():
        raise MainGuardError("this process is a spawned child still importing your script (another multiprocessing pool "
                             "re-ran it), and the script launches workers at its top level: put that code under "
                             "`if __name__ == \"__main__\":`")
    with ExitStack() as group:
        if ctx is not None:
            plan = getattr(ctx, 'launch_env', None)
            if plan is not None: env = group.enter_context(plan(nprocs))
            fn, args = run_in_context, (ctx, fn) + tuple(args)
        kwargs, need = kwargs or {}, options.need_globals
        payload = _ship(Call(fn, tuple(args), kwargs), need, arg_names)
        started = time.time()   # torch's /dev/shm files that a failed worker leaves are the ones made since
        procs, conns, files = [], [], [payload]   # the call's files have no name: they go with the last process holding them
        try:
            world = {'WORLD_SIZE': str(nprocs), 'LOCAL_WORLD_SIZE': str(nprocs)}
            envs = [{**world, 'RANK': str(r), 'LOCAL_RANK': str(r), **((env(r) if callable(env) else env) or {})} for r in range(nprocs)]
            light = env is None and not payload.needs_torch
            ctx = context or _context(options.start_method, light)
            forkserver = ctx.get_start_method() == 'forkserver'
            files.append(call := AnonymousFile(shm_root()))   # a file, not a Process argument: the start-up data stays small
            call.write(payload.data)
            files += (stacks := [AnonymousFile(shm_root()) for _ in range(nprocs)])
            spec = WorkerSpec(env=envs, payload=call.path, stacks=[f.path for f in stacks], results=shm_root(),
                              spill=tempfile.gettempdir(), gather=gather, seed=_caller_seed(),
                              imports=options.imports, parent_pid=None if forkserver else os.getpid(),
                              base_env=dict(os.environ) if forkserver else None)
            with main_not_rerun():   # workers never run the user's script: its code travels by value, as a notebook's
                for r in range(nprocs):
                    parent_end, child_end = ctx.Pipe(duplex=True)
                    p = ctx.Process(target=worker_main, kwargs=dict(rank=r, conn=child_end, spec=spec), name=f'mpify-rank{r}',
                                    daemon=False)
                    p.start()
                    child_end.close()
                    procs.append(p); conns.append(parent_end)
            collected = _Collector(nprocs, on_output or _default_output(options.output), on_event)
            _supervise(collected, procs, conns, options.timeout)
            if context is None and options.start_method == 'warm' and forkserver: mark_ready()
        except BaseException as e:   # stacks show where ranks were on a timeout, or on an interrupt they outlast
            if procs and (isinstance(e, LaunchTimeout) or (isinstance(e, WorkerError) and e.in_stuck_collective)):
                _report_stacks(e, procs, stacks)
            stuck = (lambda: _report_stacks(e, procs, stacks)) if isinstance(e, KeyboardInterrupt) else None
            _stop_workers(procs, on_stuck=stuck)
            sweep_torch_shm(started, [p.pid for p in procs])
            raise
        finally:
            for c in conns: c.close()
            for f in files: f.close()
        return list(collected.results[r] for r in range(nprocs)) if gather == 'all' else None if gather is None else collected.results[gather]

def _supervise(collected: _Collector, procs: list, conns: list, timeout: float | None):
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(range(len(procs)))
    by_conn = {id(c): r for r, c in enumerate(conns)}
    by_sentinel = {p.sentinel: r for r, p in enumerate(procs)}
    while pending:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise LaunchTimeout(f"the workers did not finish within timeout={timeout} s; all {len(procs)} were stopped")
        waitables = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        for obj in wait(waitables, timeout=left):
            if isinstance(obj, int):
                r = by_sentinel[obj]
                _drain(collected, r, conns[r])
                procs[r].join()
                pending.discard(r)
                if r not in collected.results and collected.failure is None: collected.failure = WorkerDied(r, procs[r].exitcode)
            else:
                r = by_conn[id(obj)]
                try: collected.handle(r, obj, obj.recv())
                except (EOFError, OSError): pass
            if collected.failure is not None: raise collected.failure   # `launch` stops every worker on the way out

def _drain(collected: _Collector, rank: int, conn):
    try:
        while conn.poll(): collected.handle(rank, conn, conn.recv())
    except (EOFError, OSError): pass

@surfaces_errors
@with_options(LaunchOptions)
def ranch(nprocs: int, fn: Callable, *args, caller_rank: int | None = None, gather='all', ctx=None,
          on_event: Callable | None = None, **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` on `nprocs` fresh processes (ranks 0..nprocs-1), block until all finish, and return
    every rank's result as a list in rank order (`gather=r`: rank r's only; `gather=None`: nothing; mpify's True/False too).
    `ctx`: a context manager (or a zero-argument callable returning one) entered around `fn` in every worker;
    `ctx=TorchDDPCtx()` runs `fn` in one torch.distributed group, as `in_torchddp` does. `on_event(rank, *data)` receives,
    while they run, what the workers send with `send_event(*data)`. The launch options (`need`, `imports`,
    `start_method`, `timeout`, `output`) are `LaunchOptions`'. `caller_rank` exists for mpify's callers: only None is
    accepted, since the caller never runs a rank here."""
    check_caller_rank(caller_rank)
    nprocs, options = check_nprocs(nprocs), LaunchOptions.take(kwargs)
    return launch(nprocs, check_fn(fn), args, kwargs, options, gather=gather_mode(gather, nprocs),
                  ctx=context_manager(ctx), on_event=on_event)
