"""Shared helpers for the test suite: /proc process inspection, subprocess environments, notebook execution,
and small worker functions for `ranch`.

Worker functions live here (not in the test modules) so that spawned workers unpickle them by reference from a
light module: importing this file costs nothing, importing a test module would import pytest plugins and torch.
Keep the top-level imports of this module to the standard library.
"""
from __future__ import annotations
import json, os, re, signal, socket, subprocess, sys, time
from collections import namedtuple
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHM = '/dev/shm'

# ---------------------------------------------------------------- /proc inspection

Stat = namedtuple('Stat', 'ppid state comm starttime')

def _stat(pid: int) -> Stat | None:
    "(ppid, state, comm, starttime) of `pid` from /proc/<pid>/stat, or None when it is gone."
    try:
        with open(f'/proc/{pid}/stat') as f: s = f.read()
    except OSError: return None
    fields = s[s.rindex(')') + 2:].split()
    return Stat(int(fields[1]), fields[0], s[s.index('(') + 1:s.rindex(')')], int(fields[19]))

def proc_table() -> dict[int, Stat]:
    "pid -> `Stat` of every process we can read."
    return {int(d): st for d in os.listdir('/proc') if d.isdigit() and (st := _stat(int(d))) is not None}

def _cmdline(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f: return f.read().replace(b'\0', b' ').decode(errors='replace').strip()
    except OSError: return ''

def proc_state(pid: int) -> str | None:
    "State letter of `pid` ('R', 'S', 'Z', ...), or None when the pid no longer exists."
    st = _stat(pid)
    return None if st is None else st.state

def alive(pid: int) -> bool:
    "True while `pid` exists and is not a zombie (a zombie has finished running; it only awaits reaping)."
    return proc_state(pid) not in (None, 'Z', 'X')

def children_of(pid: int | None = None) -> list[dict]:
    """Every descendant of `pid` (default: this process), zombies included, as dicts with pid, ppid, state, comm,
    starttime, cmdline. A zombie child is a leftover too: nobody reaped it."""
    root = os.getpid() if pid is None else pid
    table = proc_table()
    kids: dict[int, list[int]] = {}
    for p, st in table.items(): kids.setdefault(st.ppid, []).append(p)
    out, todo = [], list(kids.get(root, []))
    while todo:
        p = todo.pop()
        out.append(dict(pid=p, **table[p]._asdict(), cmdline=_cmdline(p)))
        todo += kids.get(p, [])
    return sorted(out, key=lambda d: d['pid'])

def mp_helper_pids() -> set[int]:
    """Long-lived helper processes that (std)multiprocessing keeps on purpose for the life of this process: the
    forkserver and the resource tracker. They are not leftovers of a launch; their descendants are."""
    out = set()
    for pkg in ('multiprocess', 'multiprocessing'):
        fs = sys.modules.get(f'{pkg}.forkserver')
        pid = getattr(getattr(fs, '_forkserver', None), '_forkserver_pid', None)
        if pid: out.add(pid)
        rt = sys.modules.get(f'{pkg}.resource_tracker')
        pid = getattr(getattr(rt, '_resource_tracker', None), '_pid', None)
        if pid: out.add(pid)
    return out

def leftover_processes(pid: int | None = None, grace: float = 3.0, ignore=()) -> list[dict]:
    """Descendants of `pid` (default: this process) other than the multiprocessing helpers and `ignore`, after
    waiting up to `grace` seconds for them to go. A `torch_shm_manager` is reported like any other."""
    deadline = time.monotonic() + grace
    while True:
        skip = mp_helper_pids() | set(ignore)
        left = [c for c in children_of(pid) if c['pid'] not in skip]
        if not left or time.monotonic() > deadline: return left
        time.sleep(0.05)

def shm_entries() -> set[str]:
    "Names in /dev/shm (and the temp dir) that this package or torch's file_system sharing would create."
    out = set()
    for root in {SHM, _tempdir()}:
        try: names = os.listdir(root)
        except OSError: continue
        out |= {os.path.join(root, n) for n in names if n.startswith(('mpify-', 'torch_'))}
    return out

def _tempdir() -> str:
    import tempfile
    return tempfile.gettempdir()

def owner_pid(path: str) -> int | None:
    "The pid in a scratch name: `mpify-<pid>-...` (the launcher's caller) or `torch_<pid>_...` (torch's sharing)."
    m = re.match(r'(?:mpify|torch)[-_](\d+)[-_]', os.path.basename(path))
    return int(m.group(1)) if m else None

def scratch_of(pid: int) -> list[str]:
    "Scratch folders of the launcher started by process `pid` (`mpify-<pid>-*` in /dev/shm or the temp dir)."
    return sorted(p for p in shm_entries() if os.path.basename(p).startswith(f'mpify-{pid}-'))

def shm_files_held(pid: int) -> set[str]:
    "The /dev/shm files (named or not: `/dev/shm/#<inode> (deleted)`) that process `pid` has open or mapped."
    out = set()
    try:
        for fd in os.listdir(f'/proc/{pid}/fd'):
            try: target = os.readlink(f'/proc/{pid}/fd/{fd}')
            except OSError: continue
            if target.startswith(SHM + '/'): out.add(target)
        with open(f'/proc/{pid}/maps') as f:
            out |= {l.split(None, 5)[5].strip() for l in f if len(l.split(None, 5)) == 6 and l.split(None, 5)[5].startswith(SHM + '/')}
    except OSError: pass
    return out

def shm_holders(files: set[str]) -> list[int]:
    "Every process on this machine that still holds one of the /dev/shm `files` open or mapped."
    return [int(d) for d in os.listdir('/proc') if d.isdigit() and shm_files_held(int(d)) & files]

def kill_quietly(pids):
    for p in pids:
        try: os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError): pass

# ---------------------------------------------------------------- subprocesses and scripts

def free_port() -> int:
    "A TCP port on 127.0.0.1 that was free a moment ago."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def subprocess_env(**extra) -> dict:
    """os.environ plus PYTHONPATH leading to the repository and the tests folder, so a fresh interpreter imports this
    checkout's package and this module."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), str(TESTS)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env['PYTHONUNBUFFERED'] = '1'
    env.update({k: str(v) for k, v in extra.items()})
    return env

def run_script(path, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    "Run a script with this interpreter from its folder; the result also carries the script's `pid`."
    with subprocess.Popen([sys.executable, str(path), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=subprocess_env(), cwd=str(Path(path).parent)) as p:
        try: out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill(); out, err = p.communicate()
            raise AssertionError(f"{path} did not finish in {timeout} s\n{out}\n{err}")
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.pid = p.pid
    return r

def wait_for_files(paths, timeout: float = 30, proc: subprocess.Popen | None = None) -> list[str]:
    "Wait until every path exists and is non-empty; return their contents. Fails early if `proc` exits."
    deadline = time.monotonic() + timeout
    while True:
        if all(os.path.exists(p) and os.path.getsize(p) > 0 for p in paths):
            return [Path(p).read_text() for p in paths]
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited with {proc.returncode} before writing {paths}\n{out}\n{err}")
        if time.monotonic() > deadline: raise AssertionError(f"timed out waiting for {paths}")
        time.sleep(0.05)

# ---------------------------------------------------------------- notebooks

_KERNEL_DIR = None

def kernel_env() -> dict:
    """Environment for notebook kernels: PYTHONPATH as `subprocess_env`'s, and JUPYTER_PATH leading to a private
    `python3` kernelspec whose argv is this interpreter (so a fresh venv or a stray user kernelspec cannot pick
    another Python)."""
    global _KERNEL_DIR
    import tempfile
    if _KERNEL_DIR is None or not os.path.isdir(_KERNEL_DIR):
        _KERNEL_DIR = tempfile.mkdtemp(prefix='mpify-test-jupyter-')
        import atexit, shutil
        atexit.register(shutil.rmtree, _KERNEL_DIR, True)
        spec = Path(_KERNEL_DIR, 'kernels', 'python3')
        spec.mkdir(parents=True)
        (spec / 'kernel.json').write_text(json.dumps(dict(
            argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
            display_name='Python 3 (mpify tests)', language='python', metadata={'debugger': False})))
    env = subprocess_env()
    env['JUPYTER_PATH'] = os.pathsep.join([_KERNEL_DIR] + [p for p in env.get('JUPYTER_PATH', '').split(os.pathsep) if p])
    env.pop('PYTHONUNBUFFERED', None)
    env.pop('MPLBACKEND', None)
    return env

def execute_notebook(nb, cwd: str, timeout: int = 120, **client_options):
    """Execute the nbformat notebook `nb` in place on a real `python3` kernel of this interpreter (nbclient), with
    `cwd` as the kernel's working folder; `client_options` go to `NotebookClient`. Returns `nb`."""
    from nbclient import NotebookClient
    from jupyter_client.kernelspec import KernelSpecManager
    env = kernel_env()
    old = os.environ.get('JUPYTER_PATH')
    os.environ['JUPYTER_PATH'] = env['JUPYTER_PATH']   # read by the kernelspec lookup in this process
    try:
        spec = KernelSpecManager().get_kernel_spec('python3')
        assert spec.argv[0] == sys.executable, f"kernelspec python3 resolves to {spec.argv}, not {sys.executable}"
        client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': cwd}},
                                **client_options)
        client.execute(env=env)
    finally:
        if old is None: os.environ.pop('JUPYTER_PATH', None)
        else: os.environ['JUPYTER_PATH'] = old
    return nb

def run_notebook(cells: list[str], timeout: int = 120, allow_errors: bool = False, cwd: str | None = None,
                 interrupt_after: dict[int, int] | None = None):
    """Build a notebook from code `cells`, execute it with `execute_notebook`, and return the executed notebook
    (cells carry their outputs). `interrupt_after={i: s}`: interrupt the kernel (as the Jupyter stop button does)
    when cell `i` has run `s` seconds; execution then goes on with the next cell."""
    import nbformat, tempfile
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    for i, c in enumerate(nb.cells): c.metadata['mpify_index'] = i
    limits = interrupt_after or {}
    nb.metadata['kernelspec'] = dict(name='python3', display_name='Python 3', language='python')
    with tempfile.TemporaryDirectory(prefix='mpify-test-nb-') as tmp:
        execute_notebook(nb, cwd or tmp, timeout, allow_errors=allow_errors, interrupt_on_timeout=bool(limits),
                         timeout_func=lambda cell: limits.get(cell.metadata.get('mpify_index'), timeout))
    return nb

_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')

def strip_ansi(s: str) -> str: return _ANSI.sub('', s)

def cell_output(cell, stream: str | None = None) -> str:
    "All text a cell showed: streams (or only `stream`), results and error tracebacks, without colour codes."
    parts = []
    for o in cell.get('outputs', []):
        t = o['output_type']
        if t == 'stream' and stream in (None, o['name']): parts.append(o['text'])
        elif stream is None and t in ('execute_result', 'display_data'): parts.append(o['data'].get('text/plain', ''))
        elif stream is None and t == 'error': parts.append('\n'.join(o['traceback']))
    return strip_ansi(''.join(p if p.endswith('\n') else p + '\n' for p in parts))

def cell_errors(cell) -> list[dict]:
    return [o for o in cell.get('outputs', []) if o['output_type'] == 'error']

# ---------------------------------------------------------------- worker functions (run inside ranch workers)

def rank_env():
    "This worker's rank variables and pid."
    keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE')
    return {k: os.environ.get(k) for k in keys}

def env_of(*names):
    return {k: os.environ.get(k) for k in names}

def echo(*args, **kwargs):
    return int(os.environ['RANK']), args, kwargs

def rng_draws(*_):
    "One draw from each of this worker's global RNGs: Python's, numpy's, torch's."
    import random, numpy as np, torch
    return random.random(), float(np.random.rand()), float(torch.rand(()))

def square_rank(offset=0):
    r = int(os.environ['RANK'])
    return r * r + offset

def touch_rank(folder):
    "Leave evidence that this rank ran; return a value the caller should not receive with gather=None."
    r = os.environ['RANK']
    Path(folder, f'ran-{r}').write_text(str(os.getpid()))
    return f'result of rank {r}'

def delayed_rank(delays):
    "Sleep delays[rank] then return the rank: results must still come back in rank order."
    r = int(os.environ['RANK'])
    time.sleep(delays[r])
    return r

class Boom(Exception):
    "A custom exception class, importable by the caller, so `__cause__` can round-trip with its own type."

def fail_on(rank_to_fail: int, how: str, folder: str | None = None, sleep: float = 60):
    """Rank `rank_to_fail` fails `how` ('raise', 'boom', 'sigkill', 'exit3', 'badexc', 'unpicklable_result');
    the others write their pid to `folder` and sleep `sleep` seconds, so a launcher that waits for them is slow."""
    r = int(os.environ['RANK'])
    if folder: Path(folder, f'pid-{r}').write_text(str(os.getpid()))
    if r != rank_to_fail:
        time.sleep(sleep)
        return r
    time.sleep(0.3)   # let the other ranks start sleeping first
    if how == 'raise': raise ValueError(f"bad value on rank {r}")
    if how == 'boom': raise Boom('custom failure', r)
    if how == 'sigkill': os.kill(os.getpid(), signal.SIGKILL)
    if how == 'exit3': os._exit(3)
    if how == 'badexc':
        e = RuntimeError('carries a generator')
        e.gen = (i for i in range(3))   # an exception that cannot be pickled back
        raise e
    if how == 'unpicklable_result': return (i for i in range(3))
    raise AssertionError(how)

def eventful(n: int):
    "Send `n` events to the caller, print, and return a variable that `launch(env=...)` set for this rank."
    from mpify_fastai import send_event
    r = int(os.environ['RANK'])
    for i in range(n): send_event('step', r, i)
    print(f'done {r}')
    return os.environ.get('MPIFY_TEST_X')

def nested_launch():
    "A worker that launches workers of its own; its rank 1 raises."
    from mpify_fastai import ranch
    return ranch(2, fail_on, 1, 'raise', None, 0)

def sleep_forever(folder: str | None = None):
    if folder: Path(folder, f'pid-{os.environ["RANK"]}').write_text(str(os.getpid()))
    time.sleep(60)

def chatter(n_lines: int = 1):
    "Print to stdout and stderr, including a last line without a newline."
    r = os.environ['RANK']
    for i in range(n_lines): print(f'out {r} line {i}')
    print(f'err {r}', file=sys.stderr)
    sys.stdout.write(f'tail {r}')   # no newline: must still arrive
    return r

def torch_views_job(ds, X):
    """Receive a dataset of per-sample views and the tensor they view; mutate the received copy and return
    facts about it plus a large result tensor (which travels back through a segment file)."""
    import torch
    r = int(os.environ['RANK'])
    shared = ds[0][0].untyped_storage().data_ptr() == ds[1][0].untyped_storage().data_ptr()
    total = float(sum(float(x.sum()) for x, _ in ds))
    X.add_(1000.0)            # the caller's X must not change
    ds[0][0].fill_(-5.0)
    kids = [_cmdline(c['pid']) or c['comm'] for c in children_of()]   # e.g. a torch_shm_manager
    return dict(rank=r, pid=os.getpid(), children=kids, n=len(ds), total=total, views_share_storage=shared, x_first=float(X[0, 0]),
                big=torch.full((300, 300), float(r)), param=torch.nn.Parameter(torch.ones(3) * r))
