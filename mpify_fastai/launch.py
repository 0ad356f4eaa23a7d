"""Process launch and supervision: `ranch` runs a notebook function on N fresh processes and gathers results.

Each worker talks to the caller over its own pipe: output lines, events, then a result or an error.
The caller waits on pipes and process sentinels together, so a dead worker is noticed at once, and
stops every worker on the first failure, timeout or interrupt. Workers die with the caller (parent-death
signal plus a pipe watchdog), so a restarted kernel never finds yesterday's workers still running.
"""
from __future__ import annotations
import ctypes, os, shutil, signal, sys, tempfile, threading, time, traceback
from typing import Any, Callable
import multiprocess as mp
from multiprocess.connection import wait
from .errors import LaunchTimeout, MainGuardError, PayloadError, WorkerDied, WorkerError
from .imports import parse_imports, run_imports
from .serialize import check_picklable, dumps, loads, referenced_globals

__all__ = ['ranch', 'launch', 'START_METHODS', 'OUTPUT_MODES']

START_METHODS = ('warm', 'spawn', 'fork', 'forkserver')   # 'warm': fork server with torch/fastai preloaded (warm.py)
OUTPUT_MODES = ('rank0', 'all', 'none')
_MAIN_GUARD_EXIT = 86     # exit code of a worker that found itself re-importing an unguarded script
_STOP_GRACE = 1.0         # seconds between SIGTERM and SIGKILL when stopping workers
_ACK_TIMEOUT = 60.0       # how long a worker keeps its result available for the caller to map

# ---------------------------------------------------------------- caller side: checks

def _check_nprocs(nprocs) -> int:
    if isinstance(nprocs, bool) or not hasattr(nprocs, '__index__') or int(nprocs) < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    return int(nprocs)

def _need_dict(need: str | list[str] | tuple[str, ...]) -> dict:
    names = need.replace(',', ' ').split() if isinstance(need, str) else list(need)
    main = sys.modules['__main__'].__dict__
    missing = [n for n in names if n not in main]
    if missing:
        raise NameError(f"need names {', '.join(map(repr, missing))}, which {'is' if len(missing) == 1 else 'are'} "
                        "not defined in __main__ (the notebook or script); define it first or fix the spelling")
    return {n: main[n] for n in names}

def _check_gather(gather, nprocs: int):
    if gather is None or gather == 'all': return
    if isinstance(gather, bool) or not isinstance(gather, int) or not 0 <= gather < nprocs:
        raise ValueError(f"gather must be 'all', None or a rank in 0..{nprocs-1}, got {gather!r}")

def _check_timeout(timeout):
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")

def _in_bootstrap() -> bool:
    "True in a spawned child that is still importing the main module (an unguarded script calling `ranch`)."
    return bool(getattr(mp.current_process(), '_inheriting', False))

# ---------------------------------------------------------------- scratch folder for shared tensors

_SCRATCH_PREFIX = 'mpify-'

def _scratch_root() -> str:
    return '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else tempfile.gettempdir()

def _pid_alive(pid: int) -> bool:
    try: os.kill(pid, 0); return True
    except ProcessLookupError: return False
    except PermissionError: return True

def _sweep_scratch(root: str):
    "Remove scratch folders left by callers that were killed before they could clean up."
    try: names = os.listdir(root)
    except OSError: return
    for n in names:
        if not n.startswith(_SCRATCH_PREFIX): continue
        try: pid = int(n[len(_SCRATCH_PREFIX):].split('-')[0])
        except ValueError: continue
        if pid != os.getpid() and not _pid_alive(pid): shutil.rmtree(os.path.join(root, n), ignore_errors=True)

def _make_scratch() -> str:
    root = _scratch_root()
    _sweep_scratch(root)
    return tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=root)

# ---------------------------------------------------------------- worker side

def _die_with_parent(parent_pid: int | None):
    """Ask Linux to SIGKILL this worker when its parent dies (under forkserver the parent is the server, which
    exits with the caller); exit now if the caller is already gone."""
    try: ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError): pass
    if os.getppid() == 1 or (parent_pid is not None and os.getppid() != parent_pid): os._exit(1)

class _Channel:
    "The worker's end of its pipe: thread-safe sends; a watchdog thread reads acks and exits the worker when the caller is gone."
    def __init__(self, conn):
        self.conn,self.lock,self.acked = conn,threading.Lock(),threading.Event()
        threading.Thread(target=self._watch, daemon=True, name='mpify-watchdog').start()
    def send(self, *msg):
        with self.lock: self.conn.send(msg)
    def _watch(self):
        try:
            while True:
                if self.conn.recv() == 'ack': self.acked.set()
        except (EOFError, OSError):
            os.killpg(0, signal.SIGKILL) if os.getpgrp() == os.getpid() else os._exit(1)

class _LineRelay:
    "A text stream that sends each complete line to the caller as ('out', stream, text)."
    def __init__(self, chan: _Channel, name: str):
        self.chan,self.name,self.buf,self.lock = chan,name,'',threading.Lock()
    def write(self, s: str) -> int:
        with self.lock:
            self.buf += s
            if '\n' in self.buf:
                lines, self.buf = self.buf.rsplit('\n', 1)
                self.chan.send('out', self.name, lines)
        return len(s)
    def flush(self):
        with self.lock:
            if self.buf: self.chan.send('out', self.name, self.buf); self.buf = ''
    def isatty(self) -> bool: return False
    def writable(self) -> bool: return True
    @property
    def encoding(self): return 'utf-8'

_channel: _Channel | None = None   # set in a worker process

def _context(start_method: str, light: bool):
    """The multiprocess context to start workers from. Under 'warm', a light call (its payload needs neither torch nor
    fastai) made while the server is still starting runs on spawn rather than wait for the server's imports."""
    if start_method != 'warm': return mp.get_context(start_method)
    from .warm import prewarm, warm_context, warm_ready
    if light and not warm_ready() and prewarm() is not None: return mp.get_context('spawn')
    return warm_context()

def _worker(rank: int, conn, spec: dict):
    "Entry point of every worker process."
    global _channel
    _die_with_parent(spec['parent_pid'])
    os.setpgrp()    # the caller's Ctrl-C / kernel interrupt reaches the caller only; it stops us itself
    if spec.get('base_env') is not None:   # forkserver: the server's environ is from when it started, not the caller's now
        os.environ.clear(); os.environ.update(spec['base_env'])
    os.environ.update(spec['env'][rank])
    chan = _channel = _Channel(conn)
    sys.stdout, sys.stderr = _LineRelay(chan, 'stdout'), _LineRelay(chan, 'stderr')
    try:
        run_imports(spec['imports'], sys.modules['__main__'].__dict__)
        with open(spec['payload'], 'rb') as f: fn, args, kwargs = loads(f.read())
        res = fn(*args, **kwargs)
        sys.stdout.flush(); sys.stderr.flush()
        if spec['gather'] in ('all', rank):
            out = dumps(res, ship_globals=False, segment_path=os.path.join(spec['scratch'], f'result-{rank}'))
            chan.send('result', out.data)
            chan.acked.wait(_ACK_TIMEOUT)    # the caller maps our segment file before we go
        else: chan.send('result', None)
    except BaseException as e:
        try: sys.stdout.flush(); sys.stderr.flush()
        except Exception: pass
        chan.send('error', type(e).__qualname__, str(e), traceback.format_exc(), _pickled_exc(e))
        os._exit(1)   # what was sent stays readable in the pipe after we exit
    os._exit(0)       # done: threads the function left running must not keep the caller waiting

def _pickled_exc(e: BaseException) -> bytes | None:
    try:
        import dill
        data = dill.dumps(e)
        dill.loads(data)
        return data
    except Exception: return None

# ---------------------------------------------------------------- caller side: supervision

def _descendants_in_group(pgid: int) -> list[int]:
    "Live processes in process group `pgid` (a worker and whatever it started), from /proc."
    out = []
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try:
            with open(f'/proc/{d}/stat') as f: stat = f.read()
        except OSError: continue
        fields = stat[stat.rindex(')') + 2:].split()
        if int(fields[2]) == pgid and fields[0] != 'Z': out.append(int(d))
    return out

def _stop(procs: list):
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
        for pid in _descendants_in_group(p.pid):
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        if p.exitcode is None:
            p.kill(); p.join()

class _Run:
    "One launch in progress: the workers, their pipes, and what has come back."
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
            conn.send('ack')
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
           on_output: Callable | None = None, context=None) -> Any:
    """Run `fn(*args, **kwargs)` on `nprocs` new processes and gather results; the engine behind `ranch`.
    `env` adds variables to each worker (a dict, or rank -> dict); `on_event(rank, *data)` receives what workers
    send with `send_event`; `context` is a multiprocess context to start workers from (default: `start_method`)."""
    if _in_bootstrap(): os._exit(_MAIN_GUARD_EXIT)
    nprocs = _check_nprocs(nprocs)
    if not callable(fn): raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if start_method not in START_METHODS: raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if output not in OUTPUT_MODES: raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
    _check_gather(gather, nprocs); _check_timeout(timeout)
    kwargs = dict(kwargs or {})
    parse_imports(imports)
    need_vals = _need_dict(need)

    scratch = _make_scratch()
    procs, conns = [], []
    try:
        seg = os.path.join(scratch, 'payload')
        try: payload = dumps((fn, tuple(args), kwargs), need=need_vals, segment_path=seg)
        except Exception as e:
            check_picklable({'fn': fn, **{f'args[{i}]': a for i, a in enumerate(args)},
                             **{f'kwargs[{k!r}]': v for k, v in kwargs.items()}, **{f'need[{k!r}]': v for k, v in need_vals.items()},
                             **{f'global {k}': v for k, v in referenced_globals((fn, args, kwargs), need_vals).items()}})
            raise PayloadError(f"cannot send the call to the workers: {type(e).__name__}: {e}") from e
        world = {'WORLD_SIZE': str(nprocs), 'LOCAL_WORLD_SIZE': str(nprocs)}
        envs = [{**world, 'RANK': str(r), 'LOCAL_RANK': str(r), **((env(r) if callable(env) else env) or {})} for r in range(nprocs)]
        light = env is None and b'torch' not in payload.data and b'fastai' not in payload.data
        ctx = context or _context(start_method, light)
        forkserver = ctx.get_start_method() == 'forkserver'
        call = os.path.join(scratch, 'call.pkl')   # a file, not a Process argument: the start-up data stays small, so a
        with open(call, 'wb') as f: f.write(payload.data)   # worker dying at start (unguarded script) shows its exit code
        spec = dict(parent_pid=None if forkserver else os.getpid(), env=envs, imports=imports, payload=call, scratch=scratch,
                    gather=gather, base_env=dict(os.environ) if forkserver else None)
        for r in range(nprocs):
            parent_end, child_end = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker, args=(r, child_end, spec), name=f'mpify-rank{r}', daemon=False)
            p.start()
            child_end.close()
            procs.append(p); conns.append(parent_end)
        run = _Run(nprocs, on_output or _default_output(output), on_event)
        _supervise(run, procs, conns, timeout)
        if context is None and start_method == 'warm' and forkserver:
            from .warm import mark_ready
            mark_ready()
    except BaseException:
        _stop(procs)
        raise
    finally:
        for c in conns: c.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return list(run.results[r] for r in range(nprocs)) if gather == 'all' else None if gather is None else run.results[gather]

def _supervise(run: _Run, procs: list, conns: list, timeout: float | None):
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
                _drain(run, r, conns[r])
                procs[r].join()
                pending.discard(r)
                if r not in run.results and run.failure is None: run.failure = _death(r, procs[r].exitcode, len(procs))
            else:
                r = by_conn[id(obj)]
                try: run.handle(r, obj, obj.recv())
                except (EOFError, OSError): pass
            if run.failure is not None: raise run.failure   # `launch` stops every worker on the way out

def _drain(run: _Run, rank: int, conn):
    try:
        while conn.poll(): run.handle(rank, conn, conn.recv())
    except (EOFError, OSError): pass

def _death(rank: int, exitcode: int, nprocs: int) -> Exception:
    if exitcode == _MAIN_GUARD_EXIT:
        return MainGuardError("the workers re-imported your script and reached the launch again: put the code that "
                              "starts workers under `if __name__ == \"__main__\":`")
    return WorkerDied(rank, exitcode)

def send_event(*data) -> None:
    "From inside a worker: send `data` to the caller's `on_event` handler (progress, metrics...)."
    chan = _channel
    if chan is None: raise RuntimeError("send_event works only inside a worker started by ranch/in_torchddp")
    chan.send('event', *data)

def ranch(nprocs: int, fn: Callable, *args, gather='all', need: str = '', imports: str = '', start_method: str = 'warm',
          timeout: float | None = None, output: str = 'rank0', **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` on `nprocs` fresh processes (ranks 0..nprocs-1), block until all finish, and return
    every rank's result as a list in rank order (`gather=r`: rank r's only; `gather=None`: nothing).
    `need="a b"` ships those notebook globals; `imports` is import statements run in each worker first;
    `output` picks whose prints reach you: 'rank0' (and every rank's stderr), 'all' or 'none'.
    `start_method`: 'warm' (default: fork from a per-session server that has torch/fastai imported, CUDA-safe),
    'spawn' (a fresh interpreter per worker), 'fork' or 'forkserver' (multiprocess's, nothing preloaded)."""
    return launch(nprocs, fn, args, kwargs, gather=gather, need=need, imports=imports, start_method=start_method,
                  timeout=timeout, output=output)
