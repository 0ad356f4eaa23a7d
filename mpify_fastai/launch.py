"""The caller's side of a launch: `ranch` runs a notebook function on N fresh processes and gathers results.

Arguments are checked, then the call is serialized once into a scratch folder that every worker reads (the
worker's side is `worker.py`). The caller waits on pipes and process sentinels together, so a dead worker is noticed at once, and
stops every worker on the first failure, timeout or interrupt. Workers die with the caller (parent-death
signal plus a pipe watchdog), so a restarted kernel never finds yesterday's workers still running.
"""
from __future__ import annotations
import errno, inspect, os, random, shutil, signal, sys, tempfile, time
from contextlib import nullcontext
from typing import Any, Callable
import multiprocess as mp
from multiprocess.connection import wait
from .errors import LaunchTimeout, MainGuardError, PayloadError, WorkerDied, WorkerError
from ._private import in_spawn_bootstrap, skip_missing_main_path
from .procfs import process_group_members
from .files import owned_tempdir
from .imports import parse_imports
from .serialize import check_call, dumps, loads
from .warm import mark_ready, prewarm, warm_context, warm_ready
from .worker import ACK, MAIN_GUARD_EXIT, STACKS_SIGNAL, run_in_context, stack_file, worker_main

__all__ = ['ranch', 'launch', 'launch_in_context', 'check_nprocs', 'check_caller_rank', 'need_globals', 'START_METHODS',
           'OUTPUT_MODES']

START_METHODS = ('warm', 'spawn', 'fork', 'forkserver')   # 'warm': fork server with torch/fastai preloaded (warm.py)
OUTPUT_MODES = ('rank0', 'all', 'none')
_STOP_GRACE = 1.0         # seconds between SIGTERM and SIGKILL when stopping workers

# ---------------------------------------------------------------- checks, before anything starts

def check_nprocs(nprocs) -> int:
    "`nprocs` as an int, or ValueError naming it."
    if isinstance(nprocs, bool) or not hasattr(nprocs, '__index__') or int(nprocs) < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    return int(nprocs)

def _caller_seed() -> int:
    """A seed for the workers' RNGs drawn from the caller's own (torch's where loaded, as fastai's `set_seed` seeds it, else
    Python's): each call draws anew, and a seed set in the notebook makes the workers' draws repeat."""
    torch = sys.modules.get('torch')
    return int(torch.randint(0, 2**62, ())) if torch is not None else random.getrandbits(62)

def need_globals(need: str | list[str] | tuple[str, ...]) -> dict:
    "The notebook (`__main__`) globals named in `need` (\"a b\" or a list), name -> value; NameError for a missing one."
    names = need.replace(',', ' ').split() if isinstance(need, str) else list(need)
    main = sys.modules['__main__'].__dict__
    missing = [n for n in names if n not in main]
    if missing:
        raise NameError(f"need names {', '.join(map(repr, missing))}, which {'is' if len(missing) == 1 else 'are'} "
                        "not defined in __main__ (the notebook or script); define it first or fix the spelling")
    return {n: main[n] for n in names}

def _gather_mode(gather, nprocs: int):
    "`gather` as `launch` uses it: 'all', None or a rank. mpify's True and False mean 'all' and None: the caller takes no rank."
    if gather is True or gather is False: return 'all' if gather else None
    if gather is None or gather == 'all': return gather
    if not isinstance(gather, int) or not 0 <= gather < nprocs:
        raise ValueError(f"gather must be 'all' (or True), None (or False) or a rank in 0..{nprocs-1}, got {gather!r}")
    return gather

def check_caller_rank(caller_rank) -> None:
    "mpify let the caller run a rank itself; here every rank runs in a worker, so only `caller_rank=None` is accepted."
    if caller_rank is not None:
        raise ValueError(f"caller_rank={caller_rank!r}: the caller never runs a rank here, so that it never joins a process "
                         "group or touches a GPU and can always stop the workers. Every rank runs in a worker and its result "
                         "comes back: drop caller_rank, and use gather=0 for rank 0's result (default: every rank's, in order)")

def _context_manager(ctx):
    "`ctx` checked before launch: a context manager, or a zero-argument callable returning one (a class planning launches is made here)."
    if isinstance(ctx, type) and hasattr(ctx, 'launch_env'): return ctx()
    if inspect.isgenerator(getattr(ctx, 'gen', None)):
        raise TypeError("ctx is a running @contextmanager generator, which cannot be sent to other processes: pass the "
                        "function itself (ctx=my_context, not ctx=my_context())")
    if (hasattr(ctx, '__enter__') and hasattr(ctx, '__exit__')) or callable(ctx): return ctx
    raise TypeError(f"ctx must be a context manager, or a zero-argument function returning one; got {type(ctx).__name__}")

def _check_timeout(timeout):
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")

# ---------------------------------------------------------------- scratch folder for shared tensors

def _scratch_root() -> str:
    return '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else tempfile.gettempdir()

def _make_scratch() -> str:
    return owned_tempdir('call', _scratch_root())

# ---------------------------------------------------------------- starting, supervising and stopping workers

def _context(start_method: str, light: bool):
    """The multiprocess context to start workers from. Under 'warm', a light call (its payload needs neither torch nor
    fastai) made while the server is still starting runs on spawn rather than wait for the server's imports."""
    if start_method != 'warm': return mp.get_context(start_method)
    if light and not warm_ready() and prewarm() is not None: return mp.get_context('spawn')
    return warm_context()

def _report_stacks(e: BaseException, procs: list, scratch: str, wait: float = 2.0):
    """Where every live rank was when a launch timed out or was interrupted: their Python stacks, in the timeout's
    message (`e.stacks` too), or printed on an interrupt, so a rank stuck in a collective or a DataLoader shows."""
    live = {r: p for r, p in enumerate(procs) if p.exitcode is None}
    for p in live.values():
        try: os.kill(p.pid, STACKS_SIGNAL)
        except ProcessLookupError: pass
    files = {r: stack_file(scratch, r) for r in live}
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not all(os.path.exists(f) and os.path.getsize(f) for f in files.values()):
        time.sleep(0.05)
    time.sleep(0.1)   # let the last lines land
    def read(f):
        try:
            with open(f) as fh: return fh.read().strip() or '(no stack: the rank did not answer)'
        except OSError: return '(no stack: the rank did not answer)'
    e.stacks = '\n\n'.join(f"--- where rank {r} was ---\n{read(f)}" for r, f in files.items())
    if not e.stacks: return
    if isinstance(e, LaunchTimeout): e.args = (f"{e.args[0]}\n\n{e.stacks}",)
    else: print(f"mpify_fastai: interrupted; where each rank was:\n{e.stacks}", file=sys.stderr, flush=True)

def _stop_workers(procs: list):
    "Stop every worker and everything it started: SIGTERM, a short grace, SIGKILL; reap them all."
    alive = [p for p in procs if p.exitcode is None]
    for p in alive:
        try: os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            try: p.terminate()
            except Exception: pass
    deadline = time.monotonic() + _STOP_GRACE
    for p in alive: p.join(max(0, deadline - time.monotonic()))
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

    def handle(self, rank: int, conn, msg: tuple):
        kind = msg[0]
        if kind == 'out': self.on_output(rank, msg[1], msg[2])
        elif kind == 'event':
            if self.on_event is not None: self.on_event(rank, *msg[1:])
        elif kind == 'result':
            self.results[rank] = None if msg[1] is None else loads(msg[1], install_globals=False)
            conn.send(ACK)
        elif kind == 'error' and self.failure is None:
            _, exc_type, text, tb, pickled = msg
            err = WorkerError(rank, exc_type, text, tb)
            cause = None
            if pickled is not None:
                try:
                    import dill
                    cause = dill.loads(pickled)
                except Exception: cause = None
            err.__cause__ = cause
            self.failure = err

def _default_output(mode: str) -> Callable:
    def show(rank: int, stream: str, text: str):
        if mode == 'none' or (mode == 'rank0' and rank != 0 and stream == 'stdout'): return
        prefix = '' if rank == 0 else f'[rank {rank}] '
        print('\n'.join(prefix + line for line in text.split('\n')), file=sys.stderr if stream == 'stderr' else sys.stdout,
              flush=True)
    return show

def launch(nprocs: int, fn: Callable, args: tuple = (), kwargs: dict | None = None, *, gather='all', need='',
           imports: str = '', start_method: str = 'warm', timeout: float | None = None, output: str = 'rank0',
           env: dict | Callable[[int], dict] | None = None, on_event: Callable | None = None,
           on_output: Callable | None = None, context=None, arg_names: dict[str, Any] | None = None) -> Any:
    """Run `fn(*args, **kwargs)` on `nprocs` new processes and gather results; the engine behind `ranch`.
    `env` adds variables to each worker (a dict, or rank -> dict); `on_event(rank, *data)` receives what workers
    send with `send_event`; `context` is a multiprocess context to start workers from (default: `start_method`);
    `arg_names` (name -> argument) gives the names a payload error starts its path from, e.g. {'learn': learn}."""
    if in_spawn_bootstrap(): os._exit(MAIN_GUARD_EXIT)
    skip_missing_main_path()
    nprocs = check_nprocs(nprocs)
    if not callable(fn): raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if start_method not in START_METHODS: raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if output not in OUTPUT_MODES: raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
    gather = _gather_mode(gather, nprocs); _check_timeout(timeout)
    kwargs = dict(kwargs or {})
    parse_imports(imports)
    need_vals = need_globals(need)

    scratch = _make_scratch()
    spill = os.path.join(tempfile.gettempdir(), os.path.basename(scratch) + '-spill')   # results, if scratch fills up
    procs, conns = [], []
    try:
        try: payload = dumps((fn, tuple(args), kwargs), need=need_vals, segment_path=os.path.join(scratch, 'payload'))
        except OSError as e:
            if e.errno != errno.ENOSPC: raise
            shutil.rmtree(scratch, ignore_errors=True)
            scratch = owned_tempdir('call')
            print(f"mpify_fastai: {_scratch_root()} has no room for this call's data; it goes through {scratch} on disk "
                  "(slower to start). Docker: --shm-size=8g gives it room", file=sys.stderr, flush=True)
            payload = dumps((fn, tuple(args), kwargs), need=need_vals, segment_path=os.path.join(scratch, 'payload'))
        except Exception as e:
            check_call(fn, args, kwargs, need_vals, arg_names)
            raise PayloadError(f"cannot send the call to the workers: {type(e).__name__}: {e}") from e
        world = {'WORLD_SIZE': str(nprocs), 'LOCAL_WORLD_SIZE': str(nprocs)}
        envs = [{**world, 'RANK': str(r), 'LOCAL_RANK': str(r), **((env(r) if callable(env) else env) or {})} for r in range(nprocs)]
        light = env is None and b'torch' not in payload.data and b'fastai' not in payload.data
        ctx = context or _context(start_method, light)
        forkserver = ctx.get_start_method() == 'forkserver'
        call = os.path.join(scratch, 'call.pkl')   # a file, not a Process argument: the start-up data stays small, so a
        with open(call, 'wb') as f: f.write(payload.data)   # worker dying at start (unguarded script) shows its exit code
        spec = dict(parent_pid=None if forkserver else os.getpid(), env=envs, imports=imports, payload=call, scratch=scratch,
                    spill=spill, gather=gather, base_env=dict(os.environ) if forkserver else None, seed=_caller_seed())
        for r in range(nprocs):
            parent_end, child_end = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker_main, args=(r, child_end, spec), name=f'mpify-rank{r}', daemon=False)
            p.start()
            child_end.close()
            procs.append(p); conns.append(parent_end)
        collected = _Collector(nprocs, on_output or _default_output(output), on_event)
        _supervise(collected, procs, conns, timeout)
        if context is None and start_method == 'warm' and forkserver: mark_ready()
    except BaseException as e:
        if isinstance(e, (LaunchTimeout, KeyboardInterrupt)): _report_stacks(e, procs, scratch)
        _stop_workers(procs)
        raise
    finally:
        for c in conns: c.close()
        for d in (scratch, spill): shutil.rmtree(d, ignore_errors=True)
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
                if r not in collected.results and collected.failure is None: collected.failure = _death(r, procs[r].exitcode, len(procs))
            else:
                r = by_conn[id(obj)]
                try: collected.handle(r, obj, obj.recv())
                except (EOFError, OSError): pass
            if collected.failure is not None: raise collected.failure   # `launch` stops every worker on the way out

def _drain(collected: _Collector, rank: int, conn):
    try:
        while conn.poll(): collected.handle(rank, conn, conn.recv())
    except (EOFError, OSError): pass

def _death(rank: int, exitcode: int, nprocs: int) -> Exception:
    if exitcode == MAIN_GUARD_EXIT:
        return MainGuardError("the workers re-imported your script and reached the launch again: put the code that "
                              "starts workers under `if __name__ == \"__main__\":`")
    return WorkerDied(rank, exitcode)

def launch_in_context(nprocs: int, fn: Callable, args: tuple = (), kwargs: dict | None = None, ctx=None, **launch_opts) -> Any:
    """`launch` with `fn` run inside `ctx` in every worker (mpify's `ranch(ctx=)`). A context that plans launches, such as
    `TorchDDPCtx`, gives the workers their environment through its `launch_env(nprocs)`."""
    if ctx is None: return launch(nprocs, fn, args, kwargs, **launch_opts)
    nprocs = check_nprocs(nprocs)
    if not callable(fn): raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    ctx = _context_manager(ctx)
    plan = getattr(ctx, 'launch_env', None)
    with (plan(nprocs) if plan is not None else nullcontext()) as env:
        return launch(nprocs, run_in_context, (ctx, fn) + tuple(args), kwargs, env=env, **launch_opts)

def ranch(nprocs: int, fn: Callable, *args, caller_rank: int | None = None, gather='all', ctx=None, need: str = '',
          imports: str = '', start_method: str = 'warm', timeout: float | None = None, output: str = 'rank0', **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` on `nprocs` fresh processes (ranks 0..nprocs-1), block until all finish, and return
    every rank's result as a list in rank order (`gather=r`: rank r's only; `gather=None`: nothing; mpify's True/False too).
    `ctx`: a context manager (or a zero-argument callable returning one) entered around `fn` in every worker;
    `ctx=TorchDDPCtx()` runs `fn` in one torch.distributed group, as `in_torchddp` does.
    `need="a b"` ships those notebook globals; `imports` is import statements run in each worker first;
    `output` picks whose prints reach you: 'rank0' (and every rank's stderr), 'all' or 'none'.
    `start_method`: 'warm' (default: fork from a per-session server that has torch/fastai imported, CUDA-safe),
    'spawn' (a fresh interpreter per worker), 'fork' or 'forkserver' (multiprocess's, nothing preloaded).
    `caller_rank` exists for mpify's callers: only None is accepted, since the caller never runs a rank here."""
    check_caller_rank(caller_rank)
    return launch_in_context(nprocs, fn, args, kwargs, ctx, gather=gather, need=need, imports=imports,
                             start_method=start_method, timeout=timeout, output=output)
