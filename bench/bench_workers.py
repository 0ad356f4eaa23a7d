"""Measurement tasks for bench/run.py, and the functions that worker processes need to import.

Each `task_*` runs in its own fresh interpreter started by run.py as `python -c` (so `__main__` has no file,
as in a notebook: spawned workers do not re-import it) and returns a dict of raw timings that run.py stores.
Worker processes started by `ranch` or `torch.multiprocessing` import this module by name (bench/ is on their
PYTHONPATH), so its top-level imports stay in the standard library: importing it costs a spawned worker nothing.
"""
from __future__ import annotations
import json, os, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from helpers import free_port  # noqa: E402  (tests/helpers.py: standard library only)

TRIVIAL_SRC = "def trivial():\n    return 1\n"
FASTAI_SRC = "def uses_fastai():\n    import fastai.basics\n    return 1\n"
STATE_PARTS = 8          # tensors in the synthetic state_dict of the result-return figure
BS, N_VALID = 64, 361    # the digits learner's batch size and validation split (mpify_fastai.demo.digits_dls)

# ---------------------------------------------------------------- small helpers

def timed(fn, *args, **kwargs) -> tuple[float, object]:
    "(seconds, result) of one call."
    t = time.perf_counter()
    res = fn(*args, **kwargs)
    return time.perf_counter() - t, res

def notebook_def(src: str):
    "Define a function in `__main__` the way a notebook cell does, and return it."
    main = sys.modules['__main__'].__dict__
    before = set(main)
    exec(src, main)
    (name,) = [n for n in main if n not in before]
    return main[name]

def import_like_notebook() -> float:
    "Import torch and fastai's vision API as a notebook's first cell does; seconds it took."
    t = time.perf_counter()
    import torch  # noqa: F401
    import fastai.vision.all  # noqa: F401
    return time.perf_counter() - t

def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix='bench-payload-', dir='/dev/shm' if os.access('/dev/shm', os.W_OK) else None)

# ---------------------------------------------------------------- functions run by workers

def trivial_rank(rank: int) -> int:
    "torch.multiprocessing's entry point gets the rank first."
    return rank

def make_and_return(nbytes: int, parts: int = STATE_PARTS) -> tuple[float, dict]:
    "A model-like state_dict of `nbytes` float32 bytes, and the wall-clock time just before it is returned."
    import torch
    sd = {f'layer{i}.weight': torch.full((n,), float(i)) for i, n in enumerate(state_sizes(nbytes, parts))}
    return time.time(), sd

def state_sizes(nbytes: int, parts: int = STATE_PARTS) -> list[int]:
    "Element counts of `parts` float32 tensors that add up to `nbytes`."
    n = nbytes // 4
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]

# ---------------------------------------------------------------- figure 1: launch latency

def task_launch_ours(later: int, spawn: int, torch_spawn: int, fastai_spawn: int, setup_s: float = 0.) -> dict:
    """In a fresh notebook-like process: the first `ranch(2, f)` (starts the warm server), `later` more, then
    `ranch(..., start_method='spawn')`, `torch.multiprocessing.start_processes(spawn)`, and spawn of a function
    that imports fastai (what a training function needs). `setup_s`: seconds of notebook work (building data and
    model) between `import mpify_fastai`, which starts the warm server in the background, and the first launch."""
    out = {'import_s': import_like_notebook(), 'setup_s': setup_s}
    from torch.multiprocessing import start_processes
    from mpify_fastai import ranch
    time.sleep(setup_s)
    f, g = notebook_def(TRIVIAL_SRC), notebook_def(FASTAI_SRC)
    def run(fn, **kw):
        s, res = timed(ranch, 2, fn, **kw)
        assert res == [1, 1], res
        return s
    out['first_s'] = run(f)
    out['server_wait_s'] = wait_for_warm_server()   # a call made while the server starts runs on spawn: "later" means after
    out['later_s'] = [run(f) for _ in range(later)]
    out['spawn_s'] = [run(f, start_method='spawn') for _ in range(spawn)]
    out['torch_spawn_s'] = [timed(start_processes, trivial_rank, nprocs=2, start_method='spawn')[0] for _ in range(torch_spawn)]
    out['warm_fastai_s'] = [run(g) for _ in range(min(1, fastai_spawn))]
    out['spawn_fastai_s'] = [run(g, start_method='spawn') for _ in range(fastai_spawn)]
    return out

def wait_for_warm_server(limit: float = 120.) -> float:
    "Seconds until the warm server that `import mpify_fastai` started has finished its imports (a notebook's later cells)."
    from mpify_fastai.warm import warm_ready
    t = time.perf_counter()
    while not warm_ready() and time.perf_counter() - t < limit: time.sleep(0.05)
    return time.perf_counter() - t

def task_launch_accelerate(calls: int) -> dict:
    "accelerate's `notebook_launcher(f, num_processes=2)` (fork) in a fresh notebook-like process that never touched CUDA."
    out = {'import_s': import_like_notebook()}
    import accelerate
    from accelerate import notebook_launcher
    f = notebook_def(TRIVIAL_SRC)
    out['version'] = accelerate.__version__
    times = [timed(notebook_launcher, f, num_processes=2, use_port=str(free_port()))[0] for _ in range(calls)]
    out['first_s'], out['later_s'] = times[0], times[1:]
    return out

# ---------------------------------------------------------------- figure 2: payload

def time_ours(obj, seg: str, out: dict) -> None:
    "Append the seconds of mpify's `dumps(obj)` and of its `loads` to `out`, note the bytes, remove the segment file `seg`."
    from mpify_fastai.serialize import dumps, loads
    s, p = timed(dumps, obj, segment_path=seg)
    out['ours_dump_s'].append(s)
    out['ours_load_s'].append(timed(loads, p.data)[0])
    out.update(ours_pickle_bytes=len(p.data), ours_bytes=p.nbytes)
    os.remove(seg)

def task_payload(reps: int) -> dict:
    "Bytes and seconds to serialize and load the digits Learner: mpify's `dumps`/`loads` vs `dill.dumps(recurse=True)`."
    import_like_notebook()
    import dill
    from bench_fastai import make_learner
    learn = make_learner()
    seg = os.path.join(scratch_dir(), 'payload')
    out = {k: [] for k in ('ours_dump_s', 'ours_load_s', 'dill_dump_s', 'dill_load_s')}
    for _ in range(reps):
        time_ours(learn, seg, out)
        s, b = timed(dill.dumps, learn, recurse=True)
        out['dill_dump_s'].append(s)
        out['dill_load_s'].append(timed(dill.loads, b)[0])
        out['dill_bytes'] = len(b)
        del b
    os.rmdir(os.path.dirname(seg))
    return out

# ---------------------------------------------------------------- figures 3 and 4: fastai training

def task_train(epochs: int, rounds: int, fit1_later: int) -> dict:
    """Wall time of `fit_ddp(1)` (first call of the session, then later calls) and local `fit(1)`; how long a warm
    worker's first `DistributedDataParallel(model)` takes; then per-epoch times, alternating in each of `rounds`:
    local `fit(epochs)`, `fit_ddp(epochs, nprocs=2)` with and without the progress relay, the hand-written loop on 1 process and with DDP on 2, and
    1-thread runs of local `fit` and of the hand-written loop (a control for thread oversubscription)."""
    out = {'import_s': import_like_notebook()}
    import torch
    import mpify_fastai  # noqa: F401  (after fastai: adds Learner.fit_ddp)
    from mpify_fastai import in_torchddp
    from bench_fastai import make_learner, epoch_times
    learn = make_learner()
    out['ddp1_first_s'] = timed(learn.fit_ddp, 1, nprocs=2)[0]
    out['ddp1_later_s'] = [timed(learn.fit_ddp, 1, nprocs=2)[0] for _ in range(fit1_later)]
    out['local1_first_s'] = timed(learn.fit, 1)[0]
    out['local1_later_s'] = [timed(learn.fit, 1)[0] for _ in range(fit1_later)]
    out['ddp_ctor_s'] = in_torchddp(2, ddp_ctor_seconds)
    cores, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
    runs = {'local': lambda: epoch_times(lambda cbs: learn.fit(epochs, cbs=cbs)),
            'ddp': lambda: epoch_times(lambda cbs: learn.fit_ddp(epochs, cbs=cbs, nprocs=2)),
            'ddp_quiet': lambda: epoch_times(lambda cbs: learn.fit_ddp(epochs, cbs=cbs, nprocs=2, progress=False)),
            'raw_single': lambda: run_raw(1, epochs, cores),
            'raw_ddp': lambda: run_raw(2, epochs, max(1, cores // 2)),
            'local_1t': lambda: with_threads(1, lambda: epoch_times(lambda cbs: learn.fit(epochs, cbs=cbs))),
            'raw_single_1t': lambda: run_raw(1, epochs, 1)}
    for k in runs: out[k] = []
    for _ in range(rounds):
        for k, run in runs.items(): out[k].append(run())
    out.update(n_train=learn.dls.train.n, cores=cores, threads_local=threads)
    return out

def with_threads(n: int, fn):
    "Call `fn()` with torch limited to `n` intra-op threads, then restore the previous number."
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try: return fn()
    finally: torch.set_num_threads(old)

def ddp_ctor_seconds() -> list[float]:
    "Inside an `in_torchddp` worker: seconds of its first and of a second `DistributedDataParallel(model)`."
    from torch.nn.parallel import DistributedDataParallel
    from mpify_fastai.demo import digits_cnn
    return [timed(DistributedDataParallel, digits_cnn())[0] for _ in range(2)]

def digits_tensors():
    "The digits split of `mpify_fastai.demo.digits_dls` as tensors: (X_train, y_train, X_valid, y_valid)."
    import torch
    from sklearn.datasets import load_digits
    d = load_digits()
    X, y = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16., torch.tensor(d.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[order], y[order]
    return X[N_VALID:], y[N_VALID:], X[:N_VALID], y[:N_VALID]

def raw_worker(rank: int, world: int, epochs: int, threads: int, out_path: str, store: str):
    """A hand-written PyTorch training loop, DDP over gloo when `world` > 1: DataLoader with (Distributed)Sampler,
    bs 64 per process, drop_last, AdamW like fastai's default Adam; validation sharded and all-reduced.
    Rank 0 writes each epoch's wall time (training + validation) to `out_path`."""
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from mpify_fastai.demo import digits_cnn
    torch.set_num_threads(threads)
    if world > 1:
        os.environ['GLOO_SOCKET_IFNAME'] = 'lo'
        dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    Xt, yt, Xv, yv = digits_tensors()
    train, valid = TensorDataset(Xt, yt), TensorDataset(Xv[rank::world], yv[rank::world])
    sampler = DistributedSampler(train, world, rank, shuffle=True, seed=0) if world > 1 else None
    dl = DataLoader(train, batch_size=BS, shuffle=sampler is None, sampler=sampler, drop_last=True)
    vdl = DataLoader(valid, batch_size=BS)
    model = digits_cnn()
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2)
    loss_fn, times = torch.nn.CrossEntropyLoss(), []
    for epoch in range(epochs):
        t = time.perf_counter()
        if sampler is not None: sampler.set_epoch(epoch)
        net.train()
        for xb, yb in dl:
            loss = loss_fn(net(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
        model.eval()
        stats = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for xb, yb in vdl:
                pred = model(xb)
                stats += torch.tensor([loss_fn(pred, yb).item() * len(yb), (pred.argmax(1) == yb).sum().item(), len(yb)])
        if world > 1: dist.all_reduce(stats)
        times.append(time.perf_counter() - t)
    if world > 1: dist.destroy_process_group()
    if rank == 0:
        with open(out_path, 'w') as f: json.dump({'epoch_s': times, 'accuracy': stats[1].item() / stats[2].item()}, f)

def run_raw(world: int, epochs: int, threads: int) -> list[float]:
    "Launch `raw_worker` on `world` processes with torch.multiprocessing spawn; rank 0's epoch times."
    from torch.multiprocessing import start_processes
    d = tempfile.mkdtemp(prefix='mpify-bench-raw-')
    out = os.path.join(d, 'out.json')
    try:
        start_processes(raw_worker, args=(world, epochs, threads, out, os.path.join(d, 'store')), nprocs=world,
                        start_method='spawn')
        with open(out) as f: return json.load(f)['epoch_s']
    finally:
        for n in os.listdir(d): os.remove(os.path.join(d, n))
        os.rmdir(d)

# ---------------------------------------------------------------- figure 5: result return

def task_return(sizes: list[int], reps: int) -> dict:
    """Seconds from a worker's `return` of an `nbytes` state_dict to the caller holding it (`ranch(1, ...,
    gather=0)`), and to its values being copied into a preallocated model-like set of tensors; vs one memcpy."""
    import torch
    from mpify_fastai import ranch
    ranch(1, make_and_return, 1 << 20, gather=0)    # starts the warm server: not what this figure measures
    out = {}
    for nbytes in sizes:
        dst = {f'layer{i}.weight': torch.zeros(n) for i, n in enumerate(state_sizes(nbytes))}
        rec, app = [], []
        for _ in range(reps):
            t_ret, sd = ranch(1, make_and_return, nbytes, gather=0)
            t_recv = time.time()
            for k, v in dst.items(): v.copy_(sd[k])
            t_app = time.time()
            assert dst['layer1.weight'][0].item() == 1.0
            rec.append(t_recv - t_ret); app.append(t_app - t_ret)
            del sd
        del dst
        x = torch.ones(nbytes // 4)
        copies = [timed(lambda: torch.empty(x.numel()).copy_(x))[0] for _ in range(reps)]
        del x
        out[str(nbytes)] = {'received_s': rec, 'applied_s': app, 'memcpy_s': copies}
    return out

# ---------------------------------------------------------------- figures 6 and 7: a real-size tabular dataset

def pss_kb(match: str = '') -> tuple[int, int]:
    "This process's proportional set size in KB: in all (smaps_rollup), and of the mappings whose path contains `match`."
    with open('/proc/self/smaps_rollup') as f: total = next(int(l.split()[1]) for l in f if l.startswith('Pss:'))
    part, inside = 0, False
    with open('/proc/self/smaps') as f:
        for line in f:
            head = line.split()
            if not head[0].endswith(':'): inside = len(head) > 5 and match in head[5]   # a mapping's first line
            elif inside and head[0] == 'Pss:': part += int(head[1])
    return total, part

def task_big_payload(reps: int, n_rows: int, n_paths: int) -> dict:
    """Serialize + load of the 1M-row tabular Learner with mpify's `dumps`/`loads`, C `pickle`, and cloudpickle (the
    alternative weighed for the design); a list of `n_paths` Paths through `ranch(2, len, items)` vs a C pickle round trip."""
    import_like_notebook()
    import pickle, cloudpickle
    from mpify_fastai import ranch
    from bench_fastai import tabular_learner_1m
    build_s, learn = timed(tabular_learner_1m, n_rows)
    out = {'build_s': build_s}
    seg = os.path.join(scratch_dir(), 'payload')
    keys = ('ours_dump_s', 'ours_load_s', 'c_dump_s', 'c_load_s', 'cloud_dump_s', 'cloud_load_s', 'paths_ranch_s', 'paths_c_s')
    out.update({k: [] for k in keys})
    items = [Path(f'/data/imagenet/train/n{i % 1000:08d}/{i:08d}.JPEG') for i in range(n_paths)]
    assert ranch(2, len, [1]) == [1, 1]    # starts the warm server: not what these figures measure
    for _ in range(reps):
        time_ours(learn, seg, out)
        for who, dump in (('c', pickle.dumps), ('cloud', cloudpickle.dumps)):
            s, b = timed(dump, learn, protocol=5)
            out[f'{who}_dump_s'].append(s)
            out[f'{who}_load_s'].append(timed(pickle.loads, b)[0])
            out[f'{who}_bytes'] = len(b)
            del b
        s, res = timed(ranch, 2, len, items)
        assert res == [n_paths] * 2
        out['paths_ranch_s'].append(s)
        out['paths_c_s'].append(timed(lambda: pickle.loads(pickle.dumps(items, protocol=5)))[0])
    os.rmdir(os.path.dirname(seg))
    out['dataset_bytes'] = int(learn.dls.train.items.memory_usage().sum() + learn.dls.valid.items.memory_usage().sum())
    return out

def task_big_fit(later: int, n_rows: int) -> dict:
    """Wall time of `fit_ddp(1, nprocs=2)` (the session's first call, then `later` more) and of a local `fit(1)` (torch's
    default threads, and 1 thread as a control) on the 1M-row tabular Learner, without progress display; each fit_ddp
    worker's PSS at the end of its first fit."""
    import_like_notebook()
    import mpify_fastai  # noqa: F401  (adds Learner.fit_ddp)
    from bench_fastai import PssProbe, tabular_learner_1m
    learn = tabular_learner_1m(n_rows)
    fd, probe = tempfile.mkstemp(prefix='mpify-bench-pss-')
    os.close(fd)
    def local():
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    try:
        out = {'ddp_first_s': timed(learn.fit_ddp, 1, nprocs=2, progress=False, cbs=PssProbe(probe))[0],
               'local_first_s': timed(local)[0], 'ddp_later_s': [], 'local_later_s': [], 'local_1t_s': []}
        for _ in range(later):
            out['ddp_later_s'].append(timed(learn.fit_ddp, 1, nprocs=2, progress=False)[0])
            out['local_later_s'].append(timed(local)[0])
            out['local_1t_s'].append(with_threads(1, lambda: timed(local)[0]))
        with open(probe) as f: out['worker_pss_kb'] = sorted([int(x) for x in line.split()] for line in f)
    finally: os.remove(probe)
    out['dataset_bytes'] = int(learn.dls.train.items.memory_usage().sum() + learn.dls.valid.items.memory_usage().sum())
    return out

# ---------------------------------------------------------------- entry point of a child process

TASKS = {'launch_ours': task_launch_ours, 'launch_accelerate': task_launch_accelerate, 'payload': task_payload,
         'train': task_train, 'return': task_return, 'big_payload': task_big_payload, 'big_fit': task_big_fit}

def child_main(argv: list[str] | None = None) -> None:
    "`python -c 'import bench_workers as b; b.child_main()' TASK PARAMS_JSON OUT_JSON`: run TASK, write its dict to OUT_JSON."
    task, params, out_path = (argv or sys.argv[1:])[:3]
    load0 = os.getloadavg()[0]
    res = TASKS[task](**json.loads(params))
    res['loadavg'] = [load0, os.getloadavg()[0]]
    with open(out_path, 'w') as f: json.dump(res, f)
