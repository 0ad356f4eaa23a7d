"""Tests of `in_torchddp` / `TorchDDPCtx`: real spawned workers forming real gloo groups, no mocks.

Every launch spawns fresh interpreters that import torch (~3-4 s each on the 2-core CI machine), so the
checks are grouped so that one launch proves several things. Worker functions live at module level: the
workers import this module by name (pytest puts tests/ on sys.path and spawn hands sys.path down).
"""
from __future__ import annotations
import ipaddress, json, os, re, signal, subprocess, sys, tempfile, threading, time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mpify_fastai import ranch, WorkerDied, WorkerError
from mpify_fastai.group import in_torchddp, visible_gpu_count
from helpers import _cmdline, _stat, children_of, free_port, proc_table

REPO = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)

# ---------------------------------------------------------------- helpers: processes and sockets from /proc

def _descendants(root: int | None = None) -> dict[int, int]:
    "Live (non-zombie) descendants of `root` (default: this process): pid -> starttime."
    return {c['pid']: c['starttime'] for c in children_of(root) if c['state'] != 'Z'}

def _alive(procs: dict[int, int]) -> dict[int, int]:
    "Those of `procs` (pid -> starttime) that still exist (zombies included: nobody reaped them), same start time."
    table = proc_table()
    return {p: st for p, st in procs.items() if p in table and table[p].starttime == st}

def _wait_gone(procs: dict[int, int], within: float = 3.0) -> dict[int, int]:
    "Give reparented processes a moment to be reaped; return the ones still there."
    deadline = time.monotonic() + within
    while True:
        left = _alive(procs)
        if not left or time.monotonic() > deadline: return left
        time.sleep(0.05)

class _Sampler:
    "Background thread recording every descendant of this process seen while a launch runs."
    def __init__(self):
        self.seen: dict[int, int] = {}
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
    def _run(self):
        while not self.stop_ev.is_set():
            self.seen.update(_descendants())
            time.sleep(0.05)
    def __enter__(self): self.before = _descendants(); self.th.start(); return self
    def __exit__(self, *exc): self.stop_ev.set(); self.th.join(); return False
    @property
    def started(self) -> dict[int, int]:
        """Processes that appeared during the launch, less multiprocess's resource tracker (one per caller, started by
        the first spawn and meant to live as long as the caller)."""
        return {p: st for p, st in self.seen.items() if self.before.get(p) != st and not _is_resource_tracker(p)}

def _is_resource_tracker(pid: int) -> bool: return 'resource_tracker import main' in _cmdline(pid)

def _split_addr(local: str) -> tuple[str, int]:
    host, port = local.rsplit(':', 1)
    host = host.strip('[]').split('%')[0]
    return host, int(port)

def _is_loopback(host: str) -> bool:
    try: ip = ipaddress.ip_address(host)
    except ValueError: return False     # '*' (every interface) or anything unparsable counts as exposed
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None: ip = ip.ipv4_mapped
    return ip.is_loopback

def _listeners_ss() -> list[tuple[int, str, int]] | None:
    "(pid, host, port) of every TCP listener `ss -ltnp` attributes to a process; None if ss is missing."
    try: out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True, timeout=20).stdout
    except FileNotFoundError: return None
    res = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] != 'LISTEN': continue
        host, port = _split_addr(parts[3])
        for pid in re.findall(r'pid=(\d+)', line): res.append((int(pid), host, port))
    return res

def _hex_addr(h: str) -> str:
    "An address from /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order."
    b = bytes.fromhex(h)
    b = b''.join(b[i:i+4][::-1] for i in range(0, len(b), 4))
    return str(ipaddress.ip_address(b))

def _listeners_proc(pids) -> list[tuple[int, str, int]]:
    "(pid, host, port) of the LISTEN sockets that processes `pids` hold, from /proc/<pid>/fd and /proc/<pid>/net/tcp{,6}."
    res = []
    for pid in pids:
        inodes = set()
        try:
            for fd in os.listdir(f'/proc/{pid}/fd'):
                try: link = os.readlink(f'/proc/{pid}/fd/{fd}')
                except OSError: continue
                m = re.fullmatch(r'socket:\[(\d+)\]', link)
                if m: inodes.add(m.group(1))
        except OSError: continue
        for table in ('tcp', 'tcp6'):
            try: lines = Path(f'/proc/{pid}/net/{table}').read_text().splitlines()[1:]
            except OSError: continue
            for line in lines:
                f = line.split()
                if f[3] != '0A' or f[9] not in inodes: continue    # 0A: TCP_LISTEN
                host, port = f[1].split(':')
                res.append((pid, _hex_addr(host), int(port, 16)))
    return res

def _store_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if re.match(r'mpify-\d+-store-', n)}

def _my_scratch_dirs() -> list[str]:
    "Scratch folders `launch` made for this process (it names them mpify-<caller pid>-*)."
    out = []
    for root in {'/dev/shm', tempfile.gettempdir()}:
        try: out += [n for n in os.listdir(root) if n.startswith(f'mpify-{os.getpid()}-')]
        except OSError: pass
    return out

def _wait_for(path: Path, limit: float = 90.0):
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline: raise TimeoutError(f"{path} did not appear within {limit} s")
        time.sleep(0.02)

# ---------------------------------------------------------------- worker functions (module level: imported by name)

def _collectives(n_expected: int):
    from mpify_fastai.group import rank_world, local_device, is_rank0
    rank, world = rank_world()
    assert dist.is_initialized() and world == n_expected == dist.get_world_size() and rank == dist.get_rank()
    assert dist.get_backend() == 'gloo'
    t = torch.tensor([rank + 1.0, 2.0 * (rank + 1)])
    dist.all_reduce(t)
    b = torch.full((3,), float(rank) * 7 + 1)
    dist.broadcast(b, src=world - 1)
    parts = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([rank * 10, rank * 10 + 1]))
    return dict(rank=rank, world=world, is_rank0=is_rank0(), device=str(local_device()), pid=os.getpid(),
                all_reduce=t.tolist(), broadcast=b.tolist(), all_gather=[p.tolist() for p in parts],
                threads=torch.get_num_threads(), omp=os.environ.get('OMP_NUM_THREADS'),
                ifname=os.environ.get('GLOO_SOCKET_IFNAME'))

def _threads_env():
    return torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'), dist.get_world_size()

def _ctx_under_ranch(store_dir: str, port: int):
    "Run by plain `ranch` (no group yet): build groups with TorchDDPCtx three ways, check each is torn down."
    from mpify_fastai.group import TorchDDPCtx, rank_world
    from mpify_fastai.worker import run_in_context
    out = {'before': dist.is_initialized(), 'rank_world_env': rank_world()}
    rank = int(os.environ['RANK'])
    # 1. explicit backend + file store
    with TorchDDPCtx(backend='gloo', init_method=f'file://{store_dir}/a') as ctx:
        out['owns'] = ctx.owns
        out['rank_world_group'] = rank_world()
        t = torch.tensor([rank + 1.0]); dist.all_reduce(t); out['sum1'] = t.item()
        with TorchDDPCtx() as inner:                 # already in a group: joins nothing, destroys nothing
            out['inner_owns'] = inner.owns
        out['after_inner'] = dist.is_initialized()
        t = torch.tensor([rank + 1.0]); dist.all_reduce(t); out['sum1b'] = t.item()
    out['after1'] = dist.is_initialized()
    # 2. the environment in_torchddp gives its workers, through its worker-side entry point
    os.environ.update(MPIFY_BACKEND='gloo', MPIFY_INIT_METHOD=f'file://{store_dir}/b')
    def body():
        t = torch.tensor([10.0 * (rank + 1)]); dist.all_reduce(t); return t.item(), dist.is_initialized()
    out['sum2'], out['inside2'] = run_in_context(TorchDDPCtx, body)   # the class: made in the worker, reads the env then
    out['after2'] = dist.is_initialized()
    for k in ('MPIFY_BACKEND', 'MPIFY_INIT_METHOD'): del os.environ[k]
    # 3. torchrun-style env:// rendezvous (MASTER_ADDR/MASTER_PORT), and a body that raises
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    try:
        with TorchDDPCtx(backend='gloo', timeout_s=60):
            b = torch.tensor([float(rank)]); dist.broadcast(b, src=1); out['bcast3'] = b.item()
            raise KeyError('inside')
    except KeyError: out['raised3'] = True
    out['after3'] = dist.is_initialized()
    return out

def _listen_probe(sync_dir: str):
    "Join the group, talk once (so gloo's sockets exist), then sit until the test has looked at our sockets."
    d = Path(sync_dir)
    t = torch.ones(1); dist.all_reduce(t)
    (d / f'ready-{dist.get_rank()}').write_text(str(os.getpid()))
    _wait_for(d / 'go', 90)
    dist.barrier()
    return os.getpid()

class _SlowToSend(RuntimeError):
    """An error that takes a second to pickle (like one carrying a large object): the window in which a rank that tore
    its group down before reporting would let its blocked peer's 'connection closed' error be reported in its place."""
    def __reduce__(self):
        if os.environ.get('RANK') == '1': time.sleep(1.0)    # only in the worker that raises it
        return (type(self), self.args)

def _raise_between(sync_dir: str):
    d, rank = Path(sync_dir), dist.get_rank()
    (d / f'pid-{rank}').write_text(str(os.getpid()))
    t = torch.ones(1); dist.all_reduce(t)
    if rank == 1:
        time.sleep(0.5)     # let rank 0 get into the second all_reduce
        raise _SlowToSend(f"rank1 gave up at={time.time()!r} store={os.environ['MPIFY_INIT_METHOD']}")
    dist.all_reduce(t)      # never completes: rank 1 is gone
    return 'rank 0 should not get here'

def _die_in_barrier(sync_dir: str):
    d, rank = Path(sync_dir), dist.get_rank()
    (d / f'pid-{rank}').write_text(str(os.getpid()))
    dist.barrier()
    if rank == 1:
        time.sleep(0.5)     # rank 0 is inside the barrier by now
        (d / 'killed-at').write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return 'rank 0 should not get here'

# ---------------------------------------------------------------- collectives, group of 1/2/3, thread share

@pytest.mark.parametrize('n', [1, 2, 3])
def test_collectives_and_thread_share(n, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    env_before = dict(os.environ)
    res = in_torchddp(n, _collectives, n, backend='gloo')
    assert [r['rank'] for r in res] == list(range(n))           # results come back in rank order
    assert len({r['pid'] for r in res}) == n and os.getpid() not in {r['pid'] for r in res}
    s = n * (n + 1) / 2
    bval = float(n - 1) * 7 + 1
    for r in res:
        assert r['world'] == n and r['is_rank0'] == (r['rank'] == 0) and r['device'] == 'cpu'
        assert r['all_reduce'] == [s, 2 * s]
        assert r['broadcast'] == [bval] * 3
        assert r['all_gather'] == [[k * 10, k * 10 + 1] for k in range(n)]
        assert r['threads'] == max(1, CORES // n), r     # fair share of the cores
        assert r['omp'] == str(max(1, CORES // n))
        # gloo pinned to loopback even where the host name resolves to a public address (here it resolves to
        # 127.0.0.1, so test_workers_listen_on_loopback_only alone would not notice the pin going missing)
        if sys.platform.startswith('linux'): assert r['ifname'] == 'lo'
    assert dict(os.environ) == env_before                    # the caller's environment is untouched
    assert not dist.is_initialized()                         # the caller never joins the group

def test_user_omp_num_threads_is_respected(monkeypatch):
    # torch caps OMP_NUM_THREADS at the core count, so the user's value must lie in 2..CORES to differ
    # from the default share for 2 ranks (CORES // 2)
    if CORES < 2: pytest.skip('needs at least 2 cores to tell the user value from the default share')
    monkeypatch.setenv('OMP_NUM_THREADS', str(CORES))
    env_before = dict(os.environ)
    res = in_torchddp(2, _threads_env)
    assert res == [(CORES, str(CORES), 2)] * 2
    assert dict(os.environ) == env_before and os.environ['OMP_NUM_THREADS'] == str(CORES)

# ---------------------------------------------------------------- TorchDDPCtx on its own

def test_torchddpctx_under_ranch(tmp_path):
    res = ranch(2, _ctx_under_ranch, str(tmp_path), free_port())
    for rank, r in enumerate(res):
        assert r['before'] is False and r['rank_world_env'] == (rank, 2)
        assert r['owns'] is True and r['rank_world_group'] == (rank, 2)
        assert r['inner_owns'] is False and r['after_inner'] is True and r['sum1'] == r['sum1b'] == 3.0
        assert r['after1'] is False                         # destroyed on exit
        assert (r['sum2'], r['inside2'], r['after2']) == (30.0, True, False)
        assert (r['bcast3'], r['raised3'], r['after3']) == (1.0, True, False)

def test_torchddpctx_needs_rank_env():
    "Outside a launcher, without RANK/WORLD_SIZE, the context says so instead of hanging."
    from mpify_fastai.group import TorchDDPCtx
    saved = {k: os.environ.pop(k) for k in ('RANK', 'WORLD_SIZE') if k in os.environ}
    try:
        with pytest.raises((KeyError, ValueError, RuntimeError), match='RANK'):
            with TorchDDPCtx(backend='gloo', init_method='file:///nonexistent/store'): pass
        assert not dist.is_initialized()
    finally: os.environ.update(saved)

# ---------------------------------------------------------------- isolation: concurrent runs, no exposed sockets

_CONCURRENT_SCRIPT = '''
import json, os, sys, time
from pathlib import Path
from mpify_fastai.group import in_torchddp

def work(tag, other, sync_dir, base):
    import torch, torch.distributed as dist
    d = Path(sync_dir)
    (d / f"{tag}-{dist.get_rank()}").write_text("up")
    deadline = time.monotonic() + 120
    while not all((d / f"{other}-{r}").exists() for r in range(2)):   # both groups are up at the same time
        if time.monotonic() > deadline: raise TimeoutError("the other run never came up")
        time.sleep(0.02)
    t = torch.tensor([base * (dist.get_rank() + 1)])
    dist.all_reduce(t)
    g = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(g, torch.tensor([base + dist.get_rank()]))
    return t.item(), [x.item() for x in g]

if __name__ == "__main__":
    tag, other, sync_dir, base = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    print("RESULT " + json.dumps(in_torchddp(2, work, tag, other, sync_dir, base, backend="gloo", timeout=240)))
'''

@pytest.mark.slow
def test_two_concurrent_runs_from_separate_processes(tmp_path):
    script = tmp_path / 'run_ddp.py'
    script.write_text(_CONCURRENT_SCRIPT)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
    procs = {tag: subprocess.Popen([sys.executable, str(script), tag, other, str(tmp_path), str(base)], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag, other, base in (('a', 'b', 1.0), ('b', 'a', 100.0))}
    outs = {}
    try:
        for tag, p in procs.items(): outs[tag] = p.communicate(timeout=280)
    finally:
        for p in procs.values():
            if p.poll() is None: p.kill(); p.wait()
    for tag, (out, err) in outs.items():
        assert procs[tag].returncode == 0, f"run {tag} failed:\n{out}\n{err}"
    res = {tag: json.loads(next(l for l in out.splitlines() if l.startswith('RESULT '))[7:]) for tag, (out, _) in outs.items()}
    # separate groups: each sums and gathers only its own ranks' values
    assert res['a'] == [[3.0, [1.0, 2.0]]] * 2
    assert res['b'] == [[300.0, [100.0, 101.0]]] * 2

def test_workers_listen_on_loopback_only(tmp_path):
    found: dict = {}
    def look():
        try:
            _wait_for(tmp_path / 'ready-0', 120); _wait_for(tmp_path / 'ready-1', 120)
            pids = {int((tmp_path / f'ready-{r}').read_text()) for r in range(2)}
            found['pids'] = pids
            found['children'] = pids <= set(_descendants())
            ss = _listeners_ss()
            found['ss_missing'] = ss is None
            found['listeners'] = sorted({x for x in (ss or []) + _listeners_proc(pids) if x[0] in pids})
        except BaseException as e: found['error'] = repr(e)
        finally: (tmp_path / 'go').write_text('go')
    th = threading.Thread(target=look, daemon=True); th.start()
    try: res = in_torchddp(2, _listen_probe, str(tmp_path), backend='gloo', timeout=240)
    finally: (tmp_path / 'go').write_text('go'); th.join(30)
    assert 'error' not in found, found
    assert set(res) == found['pids'] and found['children'], found
    listeners = found['listeners']
    # the detection works: gloo keeps a listening socket per worker (on loopback) ...
    assert {pid for pid, _, _ in listeners} == found['pids'], listeners
    # ... and none of the workers' listeners is reachable from another machine
    exposed = [x for x in listeners if not _is_loopback(x[1])]
    assert not exposed, f"workers listen on non-loopback addresses: {exposed}"

def test_listener_parsing_flags_wildcards():
    "The loopback test above must be able to fail: wildcard and public addresses count as exposed."
    assert _is_loopback('127.0.0.1') and _is_loopback('::1') and _is_loopback('::ffff:127.0.0.1')
    assert not any(_is_loopback(h) for h in ('*', '0.0.0.0', '::', '10.1.2.3', '::ffff:10.0.0.1'))
    assert _hex_addr('0100007F') == '127.0.0.1' and _hex_addr('00000000') == '0.0.0.0'
    assert _hex_addr('00000000000000000000000001000000') == '::1'
    assert _split_addr('[::ffff:127.0.0.1]:80') == ('::ffff:127.0.0.1', 80) and _split_addr('127.0.0.1%lo:5') == ('127.0.0.1', 5)
    import socket
    with socket.socket() as s:      # a real listener of this process on every interface is seen by both methods
        s.bind(('0.0.0.0', 0)); s.listen()
        port = s.getsockname()[1]
        via_proc = [x for x in _listeners_proc([os.getpid()]) if x[2] == port]
        assert via_proc == [(os.getpid(), '0.0.0.0', port)]
        ss = _listeners_ss()
        if ss is not None: assert (os.getpid(), '0.0.0.0', port) in ss

# ---------------------------------------------------------------- failures: a rank raises, a rank is killed

def _pids_from(d: Path) -> dict[int, int]:
    out = {}
    for f in d.glob('pid-*'):
        pid = int(f.read_text())
        st = _stat(pid)
        out[pid] = st.starttime if st else -1       # -1: already gone, _alive() will not find it
    return out

def test_rank_raising_between_collectives(tmp_path):
    with _Sampler() as samp:
        t0 = time.time()
        with pytest.raises(WorkerError) as ei:
            in_torchddp(2, _raise_between, str(tmp_path), backend='gloo', timeout=120)
        caught = time.time()
    e = ei.value
    assert e.rank == 1 and e.exc_type == '_SlowToSend' and 'rank 1' in str(e) and 'rank1 gave up' in str(e), str(e)[:300]
    raised_at = float(re.search(r'at=([0-9.]+)', str(e)).group(1))
    assert t0 < raised_at and caught - raised_at < 10, f"took {caught - raised_at:.1f} s after rank 1 raised"
    assert type(e.__cause__) is _SlowToSend
    # every worker is gone: the ranks that reported their pid, and anything else started during the run
    pids = _pids_from(tmp_path)
    assert len(pids) == 2
    assert not _wait_gone(pids), "workers left running"
    assert set(pids) <= set(samp.seen)
    assert not _wait_gone(samp.started), f"processes left behind: {_alive(samp.started)}"
    # the rendezvous folder of this run is removed, and so is launch's scratch folder
    store = re.search(r'store=file://(\S+)', str(e)).group(1)
    store_dir = os.path.dirname(store)
    assert os.path.dirname(store_dir) == tempfile.gettempdir() and os.path.basename(store_dir).startswith(f'mpify-{os.getpid()}-store-')
    assert not os.path.exists(store_dir), f"store folder {store_dir} left behind"
    assert not _my_scratch_dirs()

def test_rank_killed_in_barrier(tmp_path):
    with _Sampler() as samp:
        with pytest.raises(WorkerDied) as ei:
            in_torchddp(2, _die_in_barrier, str(tmp_path), backend='gloo', timeout=120)
        caught = time.time()
    killed_at = float((tmp_path / 'killed-at').read_text())
    assert caught - killed_at < 10, f"took {caught - killed_at:.1f} s after rank 1 was killed"
    assert ei.value.rank == 1 and ei.value.exitcode == -signal.SIGKILL and 'SIGKILL' in str(ei.value)
    pids = _pids_from(tmp_path)
    assert len(pids) == 2 and not _wait_gone(pids)
    assert not _wait_gone(samp.started), f"processes left behind: {_alive(samp.started)}"

# ---------------------------------------------------------------- bad input is refused before anything starts

def _fast_raise(exc, match, *args, **kw):
    before = set(_descendants())
    t = time.monotonic()
    with pytest.raises(exc, match=match) as ei:
        in_torchddp(*args, **kw)
    took = time.monotonic() - t
    assert took < 1.0, f"took {took:.2f} s: did it start processes?"
    assert not set(_descendants()) - before
    return ei.value

def _noop(): return None

def test_nccl_without_cuda_is_refused():
    if visible_gpu_count() > 0: pytest.skip('this machine has GPUs')
    e = _fast_raise(RuntimeError, r'(?i)nccl', 2, _noop, backend='nccl')
    assert 'CUDA' in str(e) or 'GPU' in str(e)

@pytest.mark.parametrize('backend', ['mpi', 'foo', 'GLOO', ''])
def test_unknown_backend_is_refused(backend):
    _fast_raise(ValueError, 'backend', 2, _noop, backend=backend)

@pytest.mark.parametrize('ndev,nprocs', [(3, 2), (1, 2), (0, 1)])
def test_devices_length_must_match_nprocs(ndev, nprocs):
    e = _fast_raise(ValueError, 'devices', nprocs, _noop, devices=list(range(ndev)))
    assert re.search(rf'\b{ndev}\b', str(e)) and re.search(rf'\b{nprocs}\b', str(e)), str(e)

@pytest.mark.parametrize('nprocs', [0, -1, True, 1.5, '2', None])
def test_bad_nprocs_is_refused(nprocs):
    _fast_raise(ValueError, 'nprocs', nprocs, _noop)

def test_non_callable_is_refused():
    _fast_raise(TypeError, 'callable', 2, 'not a function')

def test_bad_launch_options_leave_no_store_dir(tmp_path, monkeypatch):
    "Options that only `launch` checks fail fast too, after group_plan made its store folder: the folder must go."
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))   # a temp root of our own: other sessions' folders don't count
    for kw in (dict(start_method='thread'), dict(output='loud'), dict(gather=5), dict(timeout=-1), dict(imports='x = 1')):
        t = time.monotonic()
        with pytest.raises(ValueError):
            in_torchddp(2, _noop, **kw)
        assert time.monotonic() - t < 1.0, kw
    assert not _store_dirs()
    from mpify_fastai.group import group_plan
    with pytest.raises(ZeroDivisionError):
        with group_plan(2) as env:
            store_dir = os.path.dirname(env(0)['MPIFY_INIT_METHOD'][len('file://'):])
            assert os.path.isdir(store_dir) and os.path.dirname(store_dir) == str(tmp_path)
            1 / 0
    assert not os.path.exists(store_dir) and not _store_dirs()

def testpeer_failure_detection():
    "Which errors make a rank hold back its report (so the peer that failed first is the one reported)."
    from mpify_fastai.group import peer_failure
    gloo = RuntimeError('[/x/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1. '
                        'This is typically caused by a remote worker crashing.')
    assert peer_failure(gloo) and peer_failure(RuntimeError('Connection reset by peer'))
    try:
        try: raise gloo
        except RuntimeError as inner: raise ValueError('wrapped by user code') from inner
    except ValueError as outer: assert peer_failure(outer)
    assert not peer_failure(RuntimeError('rank1 gave up')) and not peer_failure(ValueError('Connection closed by peer'))
    assert not peer_failure(None)

def _uneven_gathers(n: int) -> int:
    "Collectives whose sizes differ by rank, as exact metrics' gathers do; then the rank returns at once."
    r, out = dist.get_rank(), [None] * dist.get_world_size()
    for i in range(n): dist.all_gather_object(out, {'x': torch.randn(1000 * (r + 1) * (i % 3 + 1))})
    return r

def test_group_teardown_never_hangs():
    """40 short group launches each end at once: torch 2.6's gloo teardown blocked forever about 1 launch in 20 (both
    ranks in destroy_process_group); ranks now meet at a barrier and a launcher's worker exits without it."""
    t = time.monotonic()
    for _ in range(40): assert in_torchddp(2, _uneven_gathers, 5, timeout=30) == [0, 1]
    assert time.monotonic() - t < 120

def test_stuck_collective_raises_with_every_rank_stack():
    "A collective whose peer never comes raises after collective_timeout, naming the rank, with the other rank's stack."
    t = time.monotonic()
    with pytest.raises(WorkerError) as e: in_torchddp(2, _one_rank_reduces, collective_timeout=3)
    assert e.value.rank == 0 and 'Timed out waiting 3000' in str(e.value)
    assert '--- where rank 1 was ---' in str(e.value) and 'in _one_rank_reduces' in e.value.stacks
    assert time.monotonic() - t < 30

def _one_rank_reduces():
    if dist.get_rank() == 0: dist.all_reduce(torch.ones(1))
    else: time.sleep(600)
