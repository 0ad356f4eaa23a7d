"""The worker's side of a launch: its entry point, its end of the pipe, and the forwarding of its output.

A worker starts from a `WorkerSpec` and sends, over its own pipe, typed records: `Output` lines and `Event`s, then one
`Result` or one `Failure`; the caller answers a result with `Ack`.
It dies with its caller (parent-death signal plus a watchdog on the pipe), runs in its own process group so the
caller's Ctrl-C reaches only the caller, and keeps a result's segment file until the caller acks it.
"""
from __future__ import annotations
import ctypes, errno, faulthandler, os, random, signal, sys, threading, warnings
from dataclasses import dataclass
from typing import Callable
from .errors import user_traceback
from .imports import run_imports
from .serialize import dumps, loads

__all__ = ['Call', 'WorkerSpec', 'Output', 'Event', 'Result', 'Failure', 'Ack', 'worker_main', 'run_in_context', 'send_event',
           'seed_global_rngs', 'STACKS_SIGNAL']

@dataclass(frozen=True)
class Call:
    "The function every worker runs, with its arguments: what a launch ships once, in its payload."
    fn: Callable
    args: tuple
    kwargs: dict

@dataclass(frozen=True)
class WorkerSpec:
    "What every worker of a launch starts from, sent once by the caller."
    env: list[dict]                 # each rank's added environment variables, by rank
    payload: str                    # the file holding the pickled `Call`
    stacks: list[str]               # each rank's file for its Python stacks, on request (STACKS_SIGNAL)
    results: str                    # the folder a result's large buffers go to (in a file with no name)
    spill: str                      # where they go if `results` is full
    gather: str | int | None        # whose results go home: 'all', a rank, or None
    seed: int                       # the caller's draw, from which each rank seeds its global RNGs
    imports: str = ''               # import statements run in the worker's __main__ first
    parent_pid: int | None = None   # the caller, where the worker is its child (exit at once if it is gone)
    base_env: dict | None = None    # the caller's environment, for a fork server started before it changed

# ---------------------------------------------------------------- what crosses the pipe

@dataclass(frozen=True)
class Output:
    "Complete lines a worker printed on `stream` ('stdout' or 'stderr')."
    stream: str
    text: str

@dataclass(frozen=True)
class Event:
    "What a worker sent with `send_event`, for the caller's `on_event(rank, *data)`."
    data: tuple

@dataclass(frozen=True)
class Result:
    "The worker's return value as a `serialize.dumps` payload (None when its result is not gathered)."
    payload: bytes | None

@dataclass(frozen=True)
class Failure:
    "The worker raised: the exception's type name, message and traceback from the user's code down; pickled if it can be."
    exc_type: str
    message: str
    traceback: str
    pickled: bytes | None

@dataclass(frozen=True)
class Ack:
    "The caller's reply once it has mapped a result's segment file: the worker may go."

_ACK_TIMEOUT = 60.0      # how long a worker keeps its result available for the caller to map

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
    def send(self, msg: Output | Event | Result | Failure):
        with self.lock: self.conn.send(msg)
    def _watch(self):
        try:
            while True:
                if isinstance(self.conn.recv(), Ack): self.acked.set()
        except (EOFError, OSError):
            os.killpg(0, signal.SIGKILL) if os.getpgrp() == os.getpid() else os._exit(1)

class _OutputForwarder:
    "A text stream (the worker's stdout or stderr) that sends its complete lines to the caller as `Output`."
    def __init__(self, chan: _Channel, name: str):
        self.chan,self.name,self.buf,self.lock = chan,name,'',threading.Lock()
    def write(self, s: str) -> int:
        with self.lock:
            self.buf += s
            if '\n' in self.buf:
                lines, self.buf = self.buf.rsplit('\n', 1)
                self.chan.send(Output(self.name, lines))
        return len(s)
    def flush(self):
        with self.lock:
            if self.buf: self.chan.send(Output(self.name, self.buf)); self.buf = ''
    def isatty(self) -> bool: return False
    def writable(self) -> bool: return True
    @property
    def encoding(self): return 'utf-8'

_channel: _Channel | None = None   # set in a worker process
_stacks = None                      # the file this worker's Python stacks go to on STACKS_SIGNAL (kept open)
STACKS_SIGNAL = signal.SIGUSR1

def _stacks_on_request(path: str) -> None:
    "On STACKS_SIGNAL, write every thread's Python stack to `path`, even while blocked in a collective (faulthandler)."
    global _stacks
    _stacks = open(path, 'w')
    faulthandler.register(STACKS_SIGNAL, file=_stacks, all_threads=True)

def worker_main(rank: int, conn, spec: WorkerSpec) -> None:
    "Entry point of every worker process: set up, run the call from `spec.payload`, send its result or error, exit."
    global _channel
    _die_with_parent(spec.parent_pid)
    os.setpgrp()    # the caller's Ctrl-C / kernel interrupt reaches the caller only; it stops us itself
    if spec.base_env is not None:   # forkserver: the server's environ is from when it started, not the caller's now
        os.environ.clear(); os.environ.update(spec.base_env)
    os.environ.update(spec.env[rank])
    server = sys.modules.get('mpify_fastai._server_init')   # forked from the warm server: its imports were quiet
    if server is not None: warnings.resetwarnings(); warnings.filters.extend(server.worker_filters())
    chan = _channel = _Channel(conn)
    sys.stdout, sys.stderr = _OutputForwarder(chan, 'stdout'), _OutputForwarder(chan, 'stderr')
    _stacks_on_request(spec.stacks[rank])
    try:
        run_imports(spec.imports, sys.modules['__main__'].__dict__)
        with open(spec.payload, 'rb') as f: call = loads(f.read())
        _seed_rngs(spec.seed, rank)
        res = call.fn(*call.args, **call.kwargs)
        sys.stdout.flush(); sys.stderr.flush()
        if spec.gather in ('all', rank):
            out = _result_payload(res, spec, rank)
            chan.send(Result(out.data))
            chan.acked.wait(_ACK_TIMEOUT)    # the caller maps our segment file before we go (`out` holds it till then)
        else: chan.send(Result(None))
    except BaseException as e:
        try: sys.stdout.flush(); sys.stderr.flush()
        except Exception: pass
        chan.send(Failure(type(e).__qualname__, str(e), user_traceback(e), _pickled_exception(e)))
        os._exit(1)   # what was sent stays readable in the pipe after we exit
    os._exit(0)       # done: threads the function left running must not keep the caller waiting

def seed_global_rngs(seed: int) -> None:
    "Seed Python's global RNG, and numpy's and torch's where loaded, with `seed` (torch's CUDA generators lazily: no CUDA init)."
    random.seed(seed)
    if (np := sys.modules.get('numpy')) is not None: np.random.seed(seed % 2**32)
    if (torch := sys.modules.get('torch')) is not None: torch.manual_seed(seed)

def _seed_rngs(seed: int, rank: int) -> None:
    """This rank's global RNGs from the caller's `seed`: distinct per rank, new with each call. Without it every worker
    forked from the warm server would start from the server's state."""
    seed_global_rngs(random.Random(f'{seed}-{rank}').getrandbits(63))

def _result_payload(res, spec: WorkerSpec, rank: int):
    "`res` serialized for the caller; its big buffers in /dev/shm, or on disk if that is full."
    try: return dumps(res, ship_globals=False, segment_dir=spec.results)
    except OSError as e:
        if e.errno != errno.ENOSPC: raise
        print(f"mpify_fastai: {spec.results} is full; rank {rank}'s result goes through {spec.spill} on disk",
              file=sys.stderr, flush=True)
        return dumps(res, ship_globals=False, segment_dir=spec.spill)

def run_in_context(ctx, fn, *args, **kwargs):
    "Run `fn(*args, **kwargs)` inside `ctx`: a context manager, or a zero-argument callable returning one."
    cm = ctx if hasattr(ctx, '__enter__') and not isinstance(ctx, type) else ctx()
    if not (hasattr(cm, '__enter__') and hasattr(cm, '__exit__')):
        raise TypeError(f"ctx() returned {type(cm).__name__}, not a context manager")
    with cm: return fn(*args, **kwargs)

def _pickled_exception(e: BaseException) -> bytes | None:
    "`e` pickled for the caller to re-raise as the `__cause__`, or None when it does not survive a round trip."
    try:
        import dill
        data = dill.dumps(e)
        dill.loads(data)
        return data
    except Exception: return None

def send_event(*data) -> None:
    "From inside a worker: send `data` to the caller's `on_event` handler (progress, metrics...)."
    chan = _channel
    if chan is None: raise RuntimeError("send_event works only inside a worker started by ranch/in_torchddp")
    chan.send(Event(data))
