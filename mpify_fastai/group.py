"""DDP process group: `in_torchddp` runs a function on N workers that already form one `torch.distributed` group.

Rendezvous goes through a file store in a private temp folder (no port to collide on, nothing listening on
the network), and gloo/NCCL sockets are pinned to loopback for single-host runs. The caller never touches
CUDA: GPUs are counted through NVML, and each worker selects its own device before creating its context.
"""
from __future__ import annotations
import os, re, shutil, sys, time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence
from ._private import nvml_gpu_count
from .files import owned_tempdir
from .errors import ArgumentError, LaunchError, surfaces_errors
from .launch import (LaunchOptions, OptionRecord, check_caller_rank, check_fn, check_nprocs, context_manager, gather_mode, launch,
                     with_options)
from .worker import run_in_context

__all__ = ['in_torchddp', 'TorchDDPCtx', 'GroupOptions', 'rank_world', 'local_rank', 'local_device', 'is_rank0',
           'visible_gpu_count', 'peer_failure']

BACKENDS = ('gloo', 'nccl')
COLLECTIVE_TIMEOUT = 600.0   # seconds a collective may wait for its peers before it raises (and the caller shows every rank's stack)

def visible_gpu_count() -> int:
    "GPUs this process could use, counted without creating a CUDA context here (NVML), so forked workers stay safe."
    import torch
    if not torch.backends.cuda.is_built(): return 0
    if torch.cuda.is_initialized(): return torch.cuda.device_count()
    n = nvml_gpu_count()
    if n < 0: return 0
    vis = os.environ.get('CUDA_VISIBLE_DEVICES')
    if vis is not None: n = min(n, len([v for v in vis.split(',') if v.strip() and not v.strip().startswith('-')]))
    return n

def rank_world() -> tuple[int, int]:
    "This process's (rank, world size): from the process group if one is up, else from the environment, else (0, 1)."
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized(): return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))

def local_rank() -> int: return int(os.environ.get('LOCAL_RANK', 0))
def is_rank0() -> bool: return rank_world()[0] == 0

def local_device():
    "The device this rank computes on: the GPU `in_torchddp`/torchrun assigned it, else the CPU."
    import torch
    dev = os.environ.get('MPIFY_DEVICE')
    if dev is None: dev = str(local_rank()) if torch.cuda.is_available() else 'cpu'
    return torch.device('cpu') if dev == 'cpu' else torch.device('cuda', int(dev))

def _elastic_store(rank: int, world: int, timeout: timedelta):
    """torchrun's store, with a prefix per restart attempt: a restarted group would otherwise find the previous
    attempt's gloo addresses there and fail to connect ('Connection refused')."""
    import torch.distributed as dist
    agent = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world,
                          is_master=not agent and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"mpify/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)

class TorchDDPCtx:
    """Context manager that makes this process a member of a `torch.distributed` group and tears it down.
    Reads RANK / WORLD_SIZE (and `in_torchddp`'s MPIFY_* settings, or torchrun's MASTER_ADDR/PORT) from the environment.
    `ranch(n, fn, ctx=TorchDDPCtx())` plans the group as `in_torchddp` does (`launch_env`): `devices`, `num_threads`.
    mpify's arguments: `world_size` must equal the number of ranks, `base_rank` must be 0 (several hosts: save the job
    and run it under torchrun), `use_gpu=False` means gloo on the CPU; `addr`/`port` are refused: nothing listens."""
    def __init__(self, backend: str | None = None, init_method: str | None = None, timeout_s: float | None = None, *,
                 devices: Sequence[int] | None = None, num_threads: int | None = None, world_size: int | None = None,
                 base_rank: int = 0, use_gpu: bool = True, addr: str | None = None, port: int | None = None):
        if backend is not None and backend not in BACKENDS: raise ArgumentError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if base_rank: raise ArgumentError(f"base_rank={base_rank}: groups made here hold ranks 0..n-1 on this host. For several "
                                       "hosts, save the training with learn.save_ddp_job and run it under torchrun")
        if addr is not None or port is not None:
            raise ArgumentError("addr/port are not needed: ranch and in_torchddp meet through a private file store, so nothing "
                             "listens on the network. Remove them (a group of your own reads MASTER_ADDR/MASTER_PORT)")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
            raise ArgumentError(f"num_threads must be a positive int, got {num_threads!r}")
        self.backend,self.init_method,self.timeout_s = backend if use_gpu else (backend or 'gloo'),init_method,timeout_s
        self.devices,self.num_threads,self.world_size,self.owns,self.launched = devices,num_threads,world_size,False,False
        self.planned = False   # made by a launch (`launch_env`): its worker exits right after leaving the group

    @contextmanager
    def launch_env(self, nprocs: int) -> Iterator[Callable[[int], dict]]:
        "Caller side, before a launch: check backend and devices, make the private store; yields each rank's environment."
        if self.world_size not in (None, nprocs):
            raise ArgumentError(f"world_size={self.world_size} but {nprocs} processes are launched: they must be equal here "
                             "(several hosts: save the training with learn.save_ddp_job and run it under torchrun)")
        self.planned = True
        with group_plan(nprocs, self.backend, self.devices) as env:
            n = self.num_threads
            yield env if n is None else (lambda r: {**env(r), 'MPIFY_THREADS': str(n), 'OMP_NUM_THREADS': str(n), 'MPIFY_USER_ENV': ''})

    def __enter__(self):
        import torch, torch.distributed as dist
        if dist.is_initialized(): return self
        missing = [k for k in ('RANK', 'WORLD_SIZE') if k not in os.environ]
        if missing: raise RuntimeError(f"TorchDDPCtx needs {' and '.join(missing)} in the environment: run it under "
                                       "ranch/in_torchddp or torchrun, or set them (and MASTER_ADDR/MASTER_PORT) yourself")
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if self.world_size not in (None, world): raise ArgumentError(f"TorchDDPCtx(world_size={self.world_size}) in a world of {world}")
        dev = local_device()
        if dev.type == 'cuda': torch.cuda.set_device(dev)
        backend = self.backend or os.environ.get('MPIFY_BACKEND') or ('nccl' if dev.type == 'cuda' else 'gloo')
        threads = os.environ.get('MPIFY_THREADS')
        if threads and 'OMP_NUM_THREADS' not in os.environ.get('MPIFY_USER_ENV', ''): torch.set_num_threads(int(threads))
        kw = {'timeout': timedelta(seconds=self.timeout_s or COLLECTIVE_TIMEOUT)}
        self.launched = self.init_method is None and 'MPIFY_INIT_METHOD' in os.environ
        init_method = self.init_method or os.environ.get('MPIFY_INIT_METHOD', 'env://')
        if init_method == 'env://' and 'TORCHELASTIC_RESTART_COUNT' in os.environ:
            kw['store'] = _elastic_store(rank, world, kw['timeout'])
        else: kw['init_method'] = init_method
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
        self.owns = True
        return self

    def __exit__(self, exc_type, exc, tb):
        """Leave the group. Under a launcher an error must arrive first as its root cause: a failing rank keeps its
        group up (tearing it down would close its sockets before its error is sent, and NCCL's teardown can block on
        peers stuck in a collective); a rank whose collective failed only because a peer went away waits a moment,
        so that the peer's error or death is what gets reported. The worker exits right after either way."""
        import torch.distributed as dist
        if exc is not None and self.launched:
            if peer_failure(exc): time.sleep(_PEER_GRACE)
            return False
        if self.owns and dist.is_initialized():
            if exc is None: dist.barrier()   # every rank is done with its collectives before any leaves
            # the group a launch planned goes with its worker, which exits at once (os._exit): torch's teardown is skipped
            # there, since it can block forever (1 launch in 20 with gloo on torch 2.6; pytorch issue 75097), GIL held
            if not self.planned: dist.destroy_process_group()
        self.owns = False
        return False

@dataclass(frozen=True)
class GroupOptions(OptionRecord):
    """Which process group a launch's workers form: `backend` ('gloo', 'nccl', or None: NCCL where every rank can have its
    own GPU, else gloo) and `devices` (GPU ids, one per rank; default 0..nprocs-1), checked against the GPUs at launch;
    `collective_timeout`: seconds a collective waits for its peers before it raises, with every rank's stack."""
    backend: str | None = None
    devices: Sequence[int] | None = None
    collective_timeout: float = COLLECTIVE_TIMEOUT
    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise ArgumentError(f"backend must be one of {BACKENDS} or None, got {self.backend!r}")
        t = self.collective_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ArgumentError(f"collective_timeout must be a positive number of seconds, got {t!r}")
    def group(self) -> 'TorchDDPCtx': return TorchDDPCtx(self.backend, timeout_s=self.collective_timeout, devices=self.devices)

_PEER_FAILURE = re.compile(r'gloo/transport|Connection (?:closed|reset) by peer|Broken pipe|remote process exited')
_PEER_GRACE = 2.0   # seconds a rank whose collective failed because a peer went away waits before reporting it

def peer_failure(e: BaseException | None) -> bool:
    "Whether `e` (or what caused it) is a collective failing because another rank went away."
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and _PEER_FAILURE.search(str(e)): return True
        e = e.__cause__ or e.__context__
    return False

def _plan_devices(nprocs: int, backend: str | None, devices: Sequence[int] | None) -> tuple[str, list[str]]:
    "Choose the backend and each rank's device before anything starts; raise on what cannot work."
    if backend is not None and backend not in BACKENDS:
        raise ArgumentError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    ngpu = visible_gpu_count()
    if devices is not None:
        devices = list(devices)
        if len(devices) != nprocs:
            raise ArgumentError(f"devices lists {len(devices)} GPU id(s) for nprocs={nprocs}: give one per rank")
        bad = [d for d in devices if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < ngpu]
        if bad: raise ArgumentError(f"devices {bad} are not among the {ngpu} visible GPU(s)")
    if backend == 'nccl' or (backend is None and ngpu):
        if ngpu == 0: raise LaunchError("backend='nccl' needs CUDA GPUs, and this machine has none visible; use backend='gloo'")
        devs = devices if devices is not None else list(range(nprocs))
        if devices is None and nprocs > ngpu:
            if backend == 'nccl':
                raise ArgumentError(f"backend='nccl' needs one GPU per rank: nprocs={nprocs} but {ngpu} GPU(s) are visible")
            return 'gloo', [str(r % ngpu) for r in range(nprocs)]
        if len(set(devs)) < len(devs):
            if backend == 'nccl': raise ArgumentError(f"backend='nccl' needs a distinct GPU per rank, got devices={devs}")
            return 'gloo', [str(d) for d in devs]
        return 'nccl', [str(d) for d in devs]
    return 'gloo', ([str(d) for d in devices] if devices is not None else ['cpu'] * nprocs)

def ddp_env(nprocs: int, backend: str, devices: list[str], store_dir: str) -> Callable[[int], dict]:
    "Per-rank environment for a single-host group: file-store rendezvous, loopback-only sockets, a fair thread share."
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    common = {'MPIFY_BACKEND': backend, 'MPIFY_INIT_METHOD': f"file://{os.path.join(store_dir, 'store')}",
              'MASTER_ADDR': '127.0.0.1', 'MPIFY_THREADS': str(max(1, cores // nprocs)),
              'MPIFY_USER_ENV': ' '.join(k for k in ('OMP_NUM_THREADS',) if k in os.environ)}
    if sys.platform.startswith('linux'): common.update(GLOO_SOCKET_IFNAME='lo', NCCL_SOCKET_IFNAME='lo')
    if 'OMP_NUM_THREADS' not in os.environ: common['OMP_NUM_THREADS'] = common['MPIFY_THREADS']
    return lambda r: {**common, 'MPIFY_DEVICE': devices[r]}

@contextmanager
def group_plan(nprocs: int, backend: str | None = None, devices: Sequence[int] | None = None):
    "Check backend/devices and make a private store folder; yields the per-rank env function; removes the folder after."
    backend, devs = _plan_devices(nprocs, backend, devices)
    store_dir = owned_tempdir('store')
    try: yield ddp_env(nprocs, backend, devs, store_dir)
    finally: shutil.rmtree(store_dir, ignore_errors=True)

@surfaces_errors
@with_options(LaunchOptions, GroupOptions)
def in_torchddp(nprocs: int, fn: Callable, *args, ctx=None, world_size: int | None = None, base_rank: int = 0,
                caller_rank: int | None = None, gather='all', on_event: Callable | None = None, **kwargs) -> Any:
    """Like `ranch`, but every worker is a member of one `torch.distributed` process group while `fn` runs:
    NCCL with one GPU per rank where GPUs are visible, gloo otherwise (`backend=` overrides); `devices` picks GPU ids.
    `ctx`: your own context manager, entered inside the group around `fn`, or a `TorchDDPCtx` to use as the group.
    mpify's `world_size` must equal `nprocs` and `base_rank` be 0; `caller_rank` must be None (see `ranch`)."""
    check_caller_rank(caller_rank)
    nprocs, options, fn = check_nprocs(nprocs), LaunchOptions.take(kwargs), check_fn(fn)
    given = {k: kwargs[k] for k in ('backend', 'devices', 'collective_timeout') if k in kwargs}
    opts = GroupOptions.take(kwargs)
    group = TorchDDPCtx(opts.backend, timeout_s=opts.collective_timeout, devices=opts.devices, world_size=world_size,
                        base_rank=base_rank)
    if isinstance(ctx, TorchDDPCtx) or (isinstance(ctx, type) and issubclass(ctx, TorchDDPCtx)):
        if any(v is not None for v in given.values()):
            raise ArgumentError("give backend/devices/collective_timeout either to in_torchddp or to its ctx=TorchDDPCtx(...), not both")
        group, ctx = (ctx() if isinstance(ctx, type) else ctx), None
    if ctx is not None: fn, args = run_in_context, (context_manager(ctx), fn) + args
    return launch(nprocs, fn, args, kwargs, options, gather=gather_mode(gather, nprocs), ctx=group, on_event=on_event)
