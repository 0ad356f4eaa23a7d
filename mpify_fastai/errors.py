"""Error types raised by the launcher, each one saying what failed and where, and how they reach the user: from the
line that made the call, without the library's frames (`surfaces_errors`)."""
from __future__ import annotations
import functools, os, re, traceback
from typing import Callable

__all__ = ['UsageError', 'ArgumentError', 'ArgumentTypeError', 'NeedError', 'LaunchError', 'WorkerError', 'WorkerDied',
           'LaunchTimeout', 'MainGuardError', 'PayloadError', 'surfaces_errors', 'user_frames', 'user_traceback']

class UsageError(Exception):
    "Base of the errors about what the user passed or wrote, raised before any worker starts."

class ArgumentError(UsageError, ValueError):
    "An argument has a value that cannot work; the message names the argument and what would."

class ArgumentTypeError(UsageError, TypeError):
    "An argument is of a type that cannot work, or a call's arguments do not fit its signature."

class NeedError(UsageError, NameError):
    "`need=` names a global that the notebook (or script) does not define."

class LaunchError(RuntimeError):
    "Base class: a multi-process launch did not complete."

class WorkerError(LaunchError):
    "A worker raised. `rank`, `exc_type`, `remote_traceback` describe it; `__cause__` is the original where it unpickles."
    def __init__(self, rank: int, exc_type: str, message: str, remote_traceback: str):
        self.rank,self.exc_type,self.message,self.remote_traceback = rank,exc_type,message,remote_traceback
        msg = [l.strip() for l in message.strip().splitlines() if l.strip()]
        first = ' '.join(msg[:2]) if len(msg) > 1 and msg[0].endswith(':') else (msg[0] if msg else '')  # fastai wraps: "Exception occured in ...:"
        head = f"rank {rank} raised {exc_type}" + (f": {first}" if first else '')
        super().__init__(f"{head}\n\n--- traceback from rank {rank} ---\n{remote_traceback.rstrip()}")
    def __reduce__(self):   # picklable (a nested launch sends it back as a cause), though __init__ takes several args
        return (type(self), (self.rank, self.exc_type, self.message, self.remote_traceback), self.__dict__)
    @property
    def in_stuck_collective(self) -> bool:
        "Whether the rank raised because a collective waited past its timeout for peers that never came (gloo or NCCL)."
        return bool(_COLLECTIVE_TIMEOUT.search(self.message))

_COLLECTIVE_TIMEOUT = re.compile(r'Timed out waiting \d+ ?ms|Watchdog caught collective operation timeout')

class WorkerDied(LaunchError):
    "A worker exited without a result: killed by a signal (OOM killer, `kill -9`) or `os._exit`."
    def __init__(self, rank: int, exitcode: int):
        import signal
        self.rank,self.exitcode = rank,exitcode
        if exitcode < 0:
            try: how = f"was killed by signal {signal.Signals(-exitcode).name}"
            except ValueError: how = f"was killed by signal {-exitcode}"
            if exitcode == -9: how += " (SIGKILL: out of memory, or killed from outside)"
        else: how = f"exited with code {exitcode} before returning a result"
        super().__init__(f"rank {rank} {how}")
    def __reduce__(self): return (type(self), (self.rank, self.exitcode), self.__dict__)

class LaunchTimeout(LaunchError, TimeoutError):
    "The workers did not finish within `timeout` seconds; all of them were stopped."

class MainGuardError(UsageError, LaunchError):
    """A launch from a process that is still importing the user's script as a spawned child of another pool: only
    there does a script's top level run twice (the workers of a launch never run it)."""

class PayloadError(UsageError, TypeError):
    "An argument (or `need` global) cannot be pickled for the workers; the message names where it sits."

_PACKAGE = os.path.dirname(os.path.abspath(__file__))

def user_frames(tb: traceback.StackSummary | list) -> list:
    "A worker's frames from the first one outside this package (the user's code, or fastai's that runs it) down."
    frames = list(tb)
    first = next((i for i, f in enumerate(frames) if not os.path.abspath(f.filename).startswith(_PACKAGE)), None)
    return frames[first:] if first is not None else frames[-1:]

def user_traceback(e: BaseException) -> str:
    "`e`'s traceback as `traceback.format_exc` gives it, each exception's frames from the user's code down."
    te = t = traceback.TracebackException.from_exception(e)
    while t is not None:
        t.stack = traceback.StackSummary.from_list(user_frames(t.stack))
        t = t.__cause__ or (None if t.__suppress_context__ else t.__context__)
    return ''.join(te.format())

def surfaces_errors(fn: Callable) -> Callable:
    """Wrap a public entry point so that its usage and launch errors show the user's line and the message: the library's
    frames are cut (and hidden from IPython and pytest), and no internal exception is chained above the message."""
    @functools.wraps(fn)
    def entry(*args, **kwargs):
        __tracebackhide__ = True
        try: return fn(*args, **kwargs)
        except (UsageError, LaunchError) as e:
            raise e.with_traceback(None) from (e.__cause__ if isinstance(e, WorkerError) else None)
    return entry
