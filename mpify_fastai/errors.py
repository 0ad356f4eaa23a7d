"""Error types raised by the launcher, each one saying what failed and where."""
from __future__ import annotations

__all__ = ['LaunchError', 'WorkerError', 'WorkerDied', 'LaunchTimeout', 'MainGuardError', 'PayloadError']

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

class MainGuardError(LaunchError):
    "A script started workers at import time: spawn re-imports the main module, so the launch must sit under the main guard."

class PayloadError(TypeError):
    "An argument (or `need` global) cannot be pickled for the workers; the message names where it sits."
