"""Benchmark suite of mpify_fastai against its peers, side by side in one run: `python bench/run.py [--quick]`.

Writes bench/RESULTS.md (a table of figure, ours, peer, ratio, machine; the method; the raw numbers).
Peers that are not project dependencies (accelerate) go into the bench's own environment, bench/.venv: it is
created from the interpreter that runs this script (its packages stay visible through a `.pth` file, because
`--system-site-packages` would expose the base Python's packages, not those of a virtualenv running this), and
the script re-executes itself there. Every measurement runs in a fresh notebook-like child interpreter
(`python -c`, so `__main__` has no file), one at a time; the tasks live in bench_workers.py.
"""
from __future__ import annotations
import argparse, json, os, platform, signal, site, statistics, subprocess, sys, sysconfig, tempfile, time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / '.venv'
RESULTS = BENCH / 'RESULTS.md'
PEERS = ('accelerate',)
MB = 1 << 20
BIG_ROWS, BIG_PATHS = 1_000_000, 1_000_000   # figures 6 and 7: rows of the tabular dataset, Paths in the list

# ---------------------------------------------------------------- the bench's own environment

def _venv_python() -> Path: return VENV / 'bin' / 'python'

def _in_bench_env() -> bool: return Path(sys.prefix).resolve() == VENV.resolve()

def _parent_sites() -> list[str]:
    "Site-packages folders of the interpreter running this script (a virtualenv's own included)."
    return list(dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'], *site.getsitepackages()]))

def _make_env() -> None:
    "Create bench/.venv on top of this interpreter's packages and install the peers into it (marked done only if that worked)."
    print(f"creating {VENV} (peers: {', '.join(PEERS)})", flush=True)
    subprocess.check_call([sys.executable, '-m', 'venv', '--clear', str(VENV)])
    purelib = subprocess.check_output([str(_venv_python()), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                      text=True).strip()
    lines = [f'import site; site.addsitedir({p!r})' for p in _parent_sites()]   # addsitedir: their .pth files (editable installs) count too
    Path(purelib, '_bench_parent_env.pth').write_text('\n'.join(lines) + '\n')
    try: subprocess.check_call([str(_venv_python()), '-m', 'pip', 'install', '-q', '--disable-pip-version-check', *PEERS])
    except subprocess.CalledProcessError:   # no registry: measure what we can, the peers' rows say they failed
        print(f"could not install {', '.join(PEERS)}; their figures will be reported as failed", flush=True)
        return
    (VENV / 'bench-parent').write_text(sys.executable)

def ensure_env() -> None:
    "Re-execute this script inside bench/.venv, creating it first if it is missing or was built from another interpreter."
    if _in_bench_env(): return
    marker = VENV / 'bench-parent'
    if not (_venv_python().exists() and marker.exists() and marker.read_text() == sys.executable): _make_env()
    os.execv(str(_venv_python()), [str(_venv_python()), str(Path(__file__).resolve()), *sys.argv[1:]])

# ---------------------------------------------------------------- running the tasks

def plan(quick: bool) -> list[tuple[str, str, dict]]:
    "(result key, task, parameters) in the order they run."
    if quick:
        return [('launch_ours', 'launch_ours', dict(later=5, spawn=1, torch_spawn=1, fastai_spawn=1)),
                ('launch_ours_2', 'launch_ours', dict(later=1, spawn=0, torch_spawn=0, fastai_spawn=0, setup_s=15.)),
                ('launch_accelerate', 'launch_accelerate', dict(calls=6)),
                ('payload', 'payload', dict(reps=1)),
                ('train', 'train', dict(epochs=3, rounds=1, fit1_later=1)),
                ('return', 'return', dict(sizes=[100 * MB, 1024 * MB], reps=3)),
                ('big_payload', 'big_payload', dict(reps=1, n_rows=BIG_ROWS, n_paths=BIG_PATHS)),
                ('big_fit', 'big_fit', dict(later=1, n_rows=BIG_ROWS))]
    return [('launch_ours', 'launch_ours', dict(later=7, spawn=3, torch_spawn=2, fastai_spawn=2)),
            ('launch_accelerate', 'launch_accelerate', dict(calls=8)),
            ('launch_ours_2', 'launch_ours', dict(later=1, spawn=0, torch_spawn=0, fastai_spawn=0, setup_s=15.)),
            ('payload', 'payload', dict(reps=2)),
            ('train', 'train', dict(epochs=3, rounds=2, fit1_later=2)),
            ('return', 'return', dict(sizes=[100 * MB, 1024 * MB], reps=5)),
            ('big_payload', 'big_payload', dict(reps=3, n_rows=BIG_ROWS, n_paths=BIG_PATHS)),
            ('big_fit', 'big_fit', dict(later=3, n_rows=BIG_ROWS))]

def child_env() -> dict:
    "The child's environment: bench/ (worker helpers) and the repository on the path, for it and for its workers."
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(BENCH), str(REPO)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['PYTHONWARNINGS'] = 'ignore::FutureWarning'
    return env

def run_task(task: str, params: dict, logs: Path, timeout: float) -> dict:
    "Run one task in a fresh interpreter; its result dict, or {'error': ...} with the end of its log."
    out, log = logs / f'{task}-{time.monotonic_ns()}.json', logs / f'{task}.log'
    code = 'import bench_workers as b; b.child_main()'
    t = time.perf_counter()
    with open(log, 'a') as lf:
        p = subprocess.Popen([sys.executable, '-c', code, task, json.dumps(params), str(out)], env=child_env(),
                             cwd=tempfile.gettempdir(), stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        try: rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL); p.wait()
            rc = f'timeout after {timeout:.0f} s'
    wall = time.perf_counter() - t
    if rc == 0 and out.exists():
        res = json.loads(out.read_text())
        res['task_wall_s'] = wall
        return res
    tail = log.read_text(errors='replace').replace('\r', '\n').strip().splitlines()[-12:]
    return {'error': f'exit {rc}', 'log_tail': tail, 'task_wall_s': wall}

# ---------------------------------------------------------------- summary

def med(xs) -> float: return statistics.median(xs)

def steady(rounds: list[list[float]]) -> list[float]:
    "Epoch times after each run's first epoch, pooled over runs."
    return [t for r in rounds for t in r[1:]]

def s(x: float) -> str: return f'{x:.3f} s' if x < 10 else f'{x:.1f} s'

def size(n: int) -> str: return f'{n / MB:,.1f} MB' if n >= MB else f'{n / 1024:,.1f} KB'

def ratio(a: float, b: float, floor: tuple[str, float] | None = None) -> str:
    "`a/b`, and whether it meets `floor` ('<=' or '>=', limit)."
    r = a / b
    text = f'{r:.2f}x' if r >= 0.01 else f'{r:.2g}x'
    if floor:
        op, lim = floor
        ok = r <= lim if op == '<=' else r >= lim
        text += f" (floor {op} {lim:g}: {'met' if ok else '**MISSED**'})"
    return text

FIRST_CALL_CAUSE = ("`import mpify_fastai` starts the warm server in the background; a call that needs neither torch nor fastai "
    "made before it is ready runs on spawn (so it pays spawn's cost, plus the server's imports competing for the 2 cores); "
    "a call that needs them waits for the server, which imports them once for the session. Any "
    "function that needs fastai pays that import under spawn, in every worker, on every call: see the row against spawn "
    "of a function importing `fastai.basics`.")

def efficiency_cause(R: dict) -> str:
    "Why the DDP-efficiency floor was missed, from this run's numbers."
    t, load = R['train'], R['train']['loadavg']
    e = lambda k: med(steady(t[k]))
    eff = lambda ddp, one: e(one) / e(ddp)
    busy = (f"the machine had no spare core (1-minute load {min(load):.1f}-{max(load):.1f} on {t['cores']} cores), so two "
            "processes could not go twice as fast as one for either loop, and " if min(load) >= t['cores'] else
            f"the machine was shared (1-minute load {min(load):.1f}-{max(load):.1f} on {t['cores']} cores), and ")
    return (busy + "the 2-thread single-process baselines were "
            f"{'oversubscribed' if e('raw_single') > e('raw_single_1t') else 'measured'}: the hand-written loop took {s(e('raw_single'))} per epoch with 2 threads and {s(e('raw_single_1t'))} "
            f"with 1, local `fit` {s(e('local'))} and {s(e('local_1t'))}. They suffer unequally, which decides this ratio. Against "
            f"1-thread baselines (control row) the efficiencies are {eff('ddp', 'local_1t'):.2f} (ours) and "
            f"{eff('raw_ddp', 'raw_single_1t'):.2f} (hand-written), a ratio of "
            f"{eff('ddp', 'local_1t') / eff('raw_ddp', 'raw_single_1t'):.2f}. Per-epoch work that only `fit_ddp` does (rank 0's "
            "checkpoint file and a barrier at every epoch end, a broadcast of BatchNorm buffers and an all-reduce of the "
            "metrics at every validation) may add to it; it was not timed separately. Rerun on an idle machine to judge the floor.")
RETURN_CAUSE = ("the worker copies the tensors into the /dev/shm segment file (one copy, with tmpfs page allocation), "
    "the caller maps it copy-on-write; a loaded machine stretches the copy and the worker's exit that `ranch` waits for.")

class Table:
    "Rows of the results table; a row whose numbers are missing (a failed task) says so instead."
    def __init__(self, results: dict):
        self.results,self.rows,self.causes = results,[],{}
    def machine(self, *keys) -> str:
        loads = [x for k in keys for x in self.results.get(k, {}).get('loadavg', [])]
        cores = os.cpu_count()
        return f'{cores}-core CPU, load {min(loads):.1f}-{max(loads):.1f}' if loads else f'{cores}-core CPU'
    def add(self, figure: str, keys: tuple, make, cause=None) -> None:
        """Append `figure` with the cells `make()` returns (ours, peer, ratio), or a failure note; `cause` (text, or a
        function returning it) is the likely reason, written out if the row misses its floor."""
        if cause: self.causes[figure] = cause
        missing = [k for k in keys if k not in self.results]
        bad = [k for k in keys if k in self.results and 'error' in self.results[k]]
        if missing or bad:
            why = f"failed: {', '.join(bad)}" if bad else f"not run: {', '.join(missing)}"
            self.rows.append((figure, 'not measured', 'not measured', why, self.machine(*keys))); return
        try: ours, peer, rat = make()
        except (KeyError, ValueError, ZeroDivisionError, statistics.StatisticsError) as e:
            ours, peer, rat = 'not measured', 'not measured', f'failed: {type(e).__name__}: {e}'
        self.rows.append((figure, ours, peer, rat, self.machine(*keys)))

def launch_rows(T: Table, R: dict) -> None:
    "Figure 1: launch latency of a trivial function on 2 processes."
    ours = lambda k: R['launch_ours'][k]
    firsts = lambda: [R['launch_ours']['first_s']]
    row = lambda a, b, floor=None: (s(med(a)), s(med(b)), ratio(med(a), med(b), floor))
    lo = ('launch_ours',)
    T.add('1. Launch trivial fn on 2 procs, first call 15 s after `import mpify_fastai` (notebook setup; server pre-warmed '
          'in the background) vs `ranch(start_method="spawn")`', ('launch_ours', 'launch_ours_2'),
          lambda: row([R['launch_ours_2']['first_s']], ours('spawn_s'), ('<=', 1)), cause=FIRST_CALL_CAUSE)
    T.add('1. Launch, first call right after `import mpify_fastai` (server still starting: a call needing neither torch nor '
          'fastai runs on spawn) vs `ranch(start_method="spawn")`', lo, lambda: row(firsts(), ours('spawn_s'), ('<=', 1)),
          cause=FIRST_CALL_CAUSE)
    T.add('1. Launch, first call vs `torch.multiprocessing.start_processes(spawn)`', lo, lambda: row(firsts(), ours('torch_spawn_s')))
    T.add('1. Launch, first call vs spawn of a function that imports `fastai.basics`', lo, lambda: row(firsts(), ours('spawn_fastai_s')))
    T.add('1. Launch, later calls (median) vs accelerate `notebook_launcher(f, num_processes=2)` (fork, later calls)',
          ('launch_ours', 'launch_accelerate'), lambda: row(ours('later_s'), R['launch_accelerate']['later_s'], ('<=', 2)),
          cause='unexpected: later calls fork from the already running server; look at the raw numbers for outliers.')
    T.add('1. Launch, later calls vs `torch.multiprocessing.start_processes(spawn)`', lo, lambda: row(ours('later_s'), ours('torch_spawn_s')))

def payload_rows(T: Table, R: dict) -> None:
    "Figure 2: bytes and seconds to ship the digits Learner."
    P = lambda k: R['payload'][k]
    ship = lambda who: med([a + b for a, b in zip(P(f'{who}_dump_s'), P(f'{who}_load_s'))])
    T.add('2. Payload of the digits Learner: bytes (ours: pickle + /dev/shm segment) vs `dill.dumps(learn, recurse=True)`', ('payload',),
          lambda: (size(P('ours_bytes')), size(P('dill_bytes')), ratio(P('ours_bytes'), P('dill_bytes'))))
    T.add('2. Payload: seconds to serialize + load', ('payload',), lambda: (s(ship('ours')), s(ship('dill')), ratio(ship('ours'), ship('dill'))))

def training_rows(T: Table, R: dict) -> None:
    "Figures 3 and 4: steady-state samples/s, DDP efficiency, and the wall time of a 1-epoch fit."
    tr = ('train',)
    t = lambda k: R['train'][k]
    sps = lambda key: t('n_train') / med(steady(t(key)))
    pair = lambda a, b: (f'{sps(a):,.0f}', f'{sps(b):,.0f}', ratio(sps(a), sps(b)))
    eff = lambda ddp, one: sps(ddp) / sps(one)
    effs = lambda one, raw_one, floor=None: (f"{eff('ddp', one):.2f}", f"{eff('raw_ddp', raw_one):.2f}",
                                             ratio(eff('ddp', one), eff('raw_ddp', raw_one), floor))
    T.add('3. Training samples/s, 1 process (2 threads): local `learn.fit` vs hand-written loop', tr, lambda: pair('local', 'raw_single'))
    T.add('3. Training samples/s, DDP 2 procs x 1 thread (gloo): `fit_ddp` vs hand-written DDP loop', tr, lambda: pair('ddp', 'raw_ddp'))
    T.add('3. DDP efficiency (DDP samples/s / 1-process 2-thread samples/s): ours vs hand-written', tr,
          lambda: effs('local', 'raw_single', ('>=', 0.9)), cause=lambda: efficiency_cause(R))
    T.add('3. Control: training samples/s, 1 process with 1 thread: local `learn.fit` vs hand-written loop', tr,
          lambda: pair('local_1t', 'raw_single_1t'))
    T.add('3. Control: DDP efficiency against 1-thread 1-process runs: ours vs hand-written', tr, lambda: effs('local_1t', 'raw_single_1t'))
    def relay():
        on, off = med(steady(t('ddp'))), med(steady(t('ddp_quiet')))
        return s(on), s(off), ratio(on, off, ('<=', 1.02))
    T.add('3. Progress relay: `fit_ddp` epoch time with the live display vs `progress=False`', tr, relay,
          cause='noise: per-epoch times on this shared machine vary by more than 2%; rank 0 sends a few small events per epoch.')
    T.add('4. Wall time of 1 epoch, first call of the session: `fit_ddp(1, nprocs=2)` vs local `fit(1)` (first)', tr,
          lambda: (s(t('ddp1_first_s')), s(t('local1_first_s')), ratio(t('ddp1_first_s'), t('local1_first_s'))))
    T.add('4. Wall time of 1 epoch, later call: `fit_ddp(1, nprocs=2)` vs local `fit(1)`', tr,
          lambda: (s(med(t('ddp1_later_s'))), s(med(t('local1_later_s'))), ratio(med(t('ddp1_later_s')), med(t('local1_later_s')))))

def return_rows(T: Table, R: dict) -> None:
    "Figure 5: result return of 100 MB and 1 GB state_dicts vs one memcpy."
    for nbytes in (100 * MB, 1024 * MB):
        ret = lambda k, n=nbytes: R['return'][str(n)][k]
        row = lambda k: (s(med(ret(k))), s(med(ret('memcpy_s'))), ratio(med(ret(k)), med(ret('memcpy_s')), ('<=', 3)))
        T.add(f'5. Return a {size(nbytes)} state_dict, worker `return` -> caller holds it, vs one fresh memcpy', ('return',),
              lambda row=row: row('received_s'), cause=RETURN_CAUSE)
        T.add(f'5. Return a {size(nbytes)} state_dict, received + copied into the model-like tensors, vs one fresh memcpy',
              ('return',), lambda row=row: row('applied_s'), cause=RETURN_CAUSE)

def big_rows(T: Table, R: dict) -> None:
    "Figures 6 and 7: a 1M-row tabular Learner and 1M Paths, against C pickle and a local fit."
    P, F = (lambda k: R['big_payload'][k]), (lambda k: R['big_fit'][k])
    ship = lambda who: med([a + b for a, b in zip(P(f'{who}_dump_s'), P(f'{who}_load_s'))])
    row = lambda a, b, floor=None: (s(a), s(b), ratio(a, b, floor))
    T.add('6. Serialize + load the 1M-row tabular Learner: `dumps` + `loads` vs C `pickle.dumps` + `pickle.loads`',
          ('big_payload',), lambda: row(ship('ours'), ship('c'), ('<=', 1.5)), cause=BIG_PAYLOAD_CAUSE)
    T.add('6. Design check: cloudpickle.dumps + pickle.loads of the same Learner vs C `pickle`', ('big_payload',),
          lambda: row(ship('cloud'), ship('c')))
    T.add('6. Payload bytes: pickle stream (the rest is in the /dev/shm segment) vs C `pickle.dumps`', ('big_payload',),
          lambda: (size(P('ours_pickle_bytes')), size(P('c_bytes')), ratio(P('ours_pickle_bytes'), P('c_bytes'))))
    T.add('6. `ranch(2, len, items)` on a list of 1,000,000 `Path`s vs a C pickle round trip of it', ('big_payload',),
          lambda: row(med(P('paths_ranch_s')), med(P('paths_c_s')), ('<=', 2)), cause=BIG_PAYLOAD_CAUSE)
    T.add('7. Wall time, later call: `fit_ddp(1, nprocs=2)` vs local `fit(1)` on the 1M-row tabular Learner', ('big_fit',),
          lambda: row(med(F('ddp_later_s')), med(F('local_later_s')), ('<=', 2)), cause=lambda: big_fit_cause(R))
    T.add('7. Control: the same, vs local `fit(1)` with 1 thread', ('big_fit',),
          lambda: row(med(F('ddp_later_s')), med(F('local_1t_s'))))
    def pss():
        seg = sum(p[2] for p in F('worker_pss_kb')) * 1024
        return size(seg), size(F('dataset_bytes')), ratio(seg, F('dataset_bytes'), ('<=', 1.2))
    T.add('7. Memory: combined PSS of the 2 workers\' payload mappings vs the dataset\'s bytes (one copy, not 2)', ('big_fit',),
          pss, cause='pages of the segment were written (copy-on-write) or mapped by fewer processes than expected.')

BIG_PAYLOAD_CAUSE = ("the machine was loaded: the C pickler's own work (one call per numpy int in fastai's `idxs` lists, "
    "one `__reduce__` per Path) dominates both sides; see the raw numbers for the spread.")

def big_fit_cause(R: dict) -> str:
    F = R['big_fit']
    return (f"local `fit(1)` took {s(med(F['local_later_s']))} with torch's default threads and {s(med(F['local_1t_s']))} "
            "with 1: with other work on the machine, fewer cores than threads slow both sides unequally.")

def build_table(R: dict) -> Table:
    T = Table(R)
    for rows in (launch_rows, payload_rows, training_rows, return_rows, big_rows): rows(T, R)
    return T

def diagnostics(R: dict) -> list[str]:
    "Measured explanations for the figures: thread oversubscription, DDP construction, a breakdown of `fit_ddp(1)`."
    tr, lo, pay = R.get('train', {}), R.get('launch_ours', {}), R.get('payload', {})
    if 'error' in tr or not tr: return ['- No training numbers (the train task failed).']
    e = lambda k: med(steady(tr[k]))
    ctor = tr['ddp_ctor_s']
    out = [f"- Threads: per epoch, the hand-written loop on 1 process took {s(e('raw_single'))} with 2 threads and "
           f"{s(e('raw_single_1t'))} with 1; local `fit` {s(e('local'))} with 2 threads and {s(e('local_1t'))} with 1. "
           + ("Two threads slower than one means the 2 cores were oversubscribed (other work on the machine): the 2-thread "
              "baselines of the DDP-efficiency floor then measure the scheduler more than DDP, and the 1-thread control row "
              "is the fairer comparison." if e('raw_single') > e('raw_single_1t') else
              "Two threads helped, as they should on an idle machine."),
           f"- DDP construction: in each warm `in_torchddp` worker the first `DistributedDataParallel(model)` took "
           f"{', '.join(s(c[0]) for c in ctor)} and a second one {', '.join(s(c[1]) for c in ctor)} (rank 0, rank 1; one "
           "measurement, at another moment than the `fit_ddp` calls: single timings on this shared machine vary up to 2x). The first "
           "construction in a process imports `torch._dynamo` (~900 modules with sympy; seen with `python -X importtime`); "
           "the warm server preloads it when fastai is in use, so a warm worker constructs DDP in milliseconds.",
           f"- One epoch is {s(e('ddp'))} under `fit_ddp` and {s(e('local'))} locally (steady state); what a later "
           f"`fit_ddp(1)` adds is the launch ({s(med(lo['later_s'])) if 'later_s' in lo else '?'} for a trivial function), "
           f"serializing the Learner ({s(med(pay['ours_dump_s'])) if 'ours_dump_s' in pay else '?'}), building the process "
           "group and the DDP model (above), the first epoch's warm-up in fresh processes, and returning the result."]
    big = R.get('big_fit', {})
    if 'worker_pss_kb' in big:
        out.append("- Memory of the 1M-row `fit_ddp` workers at the end of fit (PSS from /proc/PID/smaps_rollup, and of the "
                   "payload's /dev/shm mappings from /proc/PID/smaps): " + '; '.join(
                       f"rank {r}: {size(t * 1024)} in all, {size(p * 1024)} of payload" for r, t, p in big['worker_pss_kb'])
                   + f". The dataset is {size(big['dataset_bytes'])}; the rest of a worker's PSS is its share of the "
                   "interpreter, torch and fastai (shared with the warm server it forked from) and its own training memory.")
    return out

# ---------------------------------------------------------------- RESULTS.md

def versions() -> str:
    import importlib.metadata as md
    got = []
    for name in ('mpify_fastai', 'torch', 'fastai', 'accelerate', 'multiprocess', 'dill'):
        try: got.append(f'{name} {md.version(name)}')
        except md.PackageNotFoundError: got.append(f'{name} (not installed)')
    return ', '.join(got)

def cpu_model() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

METHOD = """\
## Method

Each group of figures runs in its own fresh child interpreter started as `python -c` (so `__main__` has no file,
as in a notebook), one at a time; the child first imports `torch` and `fastai.vision.all` like a notebook's first
cell. Ratios are ours / peer, computed from numbers taken in the same run; times are medians of the repetitions
listed under raw numbers. The machine is shared with other work: the machine column gives the 1-minute load
average at the start and end of the child that measured the row, and a load above the core count means the
numbers are inflated and noisy.

1. Launch: `ranch(2, f)` with `f` a trivial function defined in `__main__` (shipped by value). The first call
   starts the warm fork server (torch and fastai preloaded); later calls fork from it. Peers: `ranch(...,
   start_method='spawn')` and `torch.multiprocessing.start_processes(fn, nprocs=2, start_method='spawn')` in the
   same child (torch's spawn needs an importable function: `bench_workers.trivial_rank`), a spawn of a function
   that imports `fastai.basics` (what any training function pays under spawn), and accelerate's
   `notebook_launcher(f, num_processes=2)` (fork-based `elastic_launch`; it takes a `__main__` function as is) in
   a separate child that never touched CUDA, on a fresh port per call. The full run measures the first call in
   two fresh children.
2. Payload: `mpify_fastai.serialize.dumps(learn, segment_path=...)` (pickle bytes + the `/dev/shm` segment file,
   `Payload.nbytes`) then `loads`, vs `dill.dumps(learn, recurse=True)` then `dill.loads`, for the digits Learner
   (`Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)`).
3. Throughput: an `EpochTimer` callback (rank 0) records each epoch's wall time (training on the 1,436 training
   images + validation on 361); samples/s = 1,436 / median epoch time, over every epoch but the first of each
   run. The hand-written loop (bench_workers.raw_worker: `DataLoader` + `DistributedSampler`, bs 64 per process,
   drop_last, AdamW like fastai's default, gloo over a file store, sharded validation all-reduced) runs on 2
   spawned processes with 1 thread each and on 1 spawned process with 2 threads. Every round runs, in the same
   child: local `fit` (torch's default 2 threads), `fit_ddp(nprocs=2)` (1 thread per worker), the hand-written
   loop on 1 process and on 2, and, as a control for thread oversubscription, local `fit` and the hand-written
   loop on 1 process with 1 thread. DDP efficiency = DDP samples/s / 1-process samples/s; the figure is ours /
   hand-written.
4. `fit_ddp(1, nprocs=2)` wall time: the session's first call (includes starting the warm server) and later
   calls, vs local `fit(1)` (its first call in the process, and later ones), same Learner.
5. Result return: `ranch(1, make_and_return, nbytes, gather=0)`; the worker builds an 8-tensor float32
   state_dict and returns `(time.time(), sd)`; the caller takes `time.time()` when `ranch` returns (received) and
   after `copy_` into a preallocated, already-touched set of tensors of the same shapes (received + applied).
   Baseline: `torch.empty(n).copy_(x)` into fresh memory (first-touch page faults included).

6. A real-size tabular dataset, tried as a new user would: a `TabularPandas` of 1,000,000 rows x 30 float32 columns
   of random data (no procs, a random 80/20 split, `bs=4096`) under `tabular_learner` (bench_fastai.tabular_learner_1m).
   `dumps(learn, segment_path=...)` + `loads` against C `pickle.dumps(learn, protocol=5)` + `pickle.loads`, and
   cloudpickle's `dumps` + `pickle.loads` (the alternative weighed for the design), alternating, median of the repeats.
   `ranch(2, len, items)` with `items` a list of 1,000,000 `Path`s (launch, serialize, both workers load, results back;
   the warm server already started) against `pickle.loads(pickle.dumps(items))`.
7. `fit_ddp(1, nprocs=2, progress=False)` on that Learner (first call, then later ones) against a local `fit(1)` without
   progress bar, alternating; the local fit once more with 1 thread as a control. At the end of the first `fit_ddp`,
   each worker reads its PSS from `/proc/self/smaps_rollup` and, from `/proc/self/smaps`, the PSS of its mappings of the
   payload's segment file; the figure compares their sum over the workers with the dataset's bytes (pandas
   `memory_usage` of the training and validation frames).

Progress relay: rank 0 sends a handful of events per epoch (epoch start, one per bar start, batch updates
throttled to one per 0.2 s, one table row); the A/B runs `fit_ddp` with the live display and with
`progress=False` (no events), alternating, steady-state epochs only.
"""

def floors_note(T: Table) -> str:
    missed = [r for r in T.rows if 'MISSED' in r[3]]
    failed = [r for r in T.rows if r[3].startswith('failed')]
    lines = []
    for r in missed:
        cause = T.causes.get(r[0], '')
        if callable(cause): cause = cause()
        lines.append(f'- Floor missed: {r[0]}: ours {r[1]}, peer {r[2]}, {r[3]}.' + (f' Likely cause: {cause}' if cause else ''))
    for r in failed: lines.append(f'- Not measured: {r[0]} ({r[3]}).')
    return '\n'.join(lines) if lines else '- Every floor was met and every figure was measured.'

def write_results(T: Table, R: dict, meta: dict) -> str:
    "Write RESULTS.md; return the table's markdown."
    head = ['figure', 'ours', 'peer', 'ratio', 'machine']
    table = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)] + ['| ' + ' | '.join(r) + ' |' for r in T.rows]
    text = f"""# mpify_fastai benchmark results

`python bench/run.py{' --quick' if meta['quick'] else ''}` ({'quick run' if meta['quick'] else 'full run'}), {meta['date']},
{meta['wall_s']:.0f} s in all. Machine: {os.cpu_count()} x {cpu_model()}, no GPU, {_mem_gb():.0f} GB RAM, Python {platform.python_version()};
{meta['versions']}.

{chr(10).join(table)}

## Floors

{floors_note(T)}

## Diagnostics

{chr(10).join(diagnostics(R))}

{METHOD}
## Raw numbers (seconds unless named otherwise)

```
{raw_numbers(R)}
```
"""
    RESULTS.write_text(text + kept_sections())
    return '\n'.join(table)

WRITTEN_HERE = ('Floors', 'Diagnostics', 'Method', 'Raw numbers')

def kept_sections() -> str:
    "The sections of the current RESULTS.md that this script does not write (other benches' figures), to keep at the end."
    old = RESULTS.read_text() if RESULTS.exists() else ''
    return ''.join(f'\n## {sec.rstrip()}\n' for sec in old.split('\n## ')[1:] if not sec.startswith(WRITTEN_HERE))

def _rounded(x):
    "`x` with floats rounded to 4 decimals, recursively."
    if isinstance(x, float): return round(x, 4)
    if isinstance(x, dict): return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list): return [_rounded(v) for v in x]
    return x

def raw_numbers(R: dict) -> str:
    "Every measured value, one line per task and field."
    return '\n'.join(f'{task}.{k}: {json.dumps(_rounded(v))}' for task, res in R.items() for k, v in res.items())

def _mem_gb() -> float:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30

# ---------------------------------------------------------------- main

def measure(quick: bool, only: list[str] | None, logs: Path) -> dict:
    "Run the plan's tasks one after another; result key -> the task's numbers (or its error)."
    R, t0 = {}, time.perf_counter()
    for key, task, params in plan(quick):
        if only and key not in only: continue
        print(f'[{time.perf_counter() - t0:6.0f} s] {key} {params}', flush=True)
        R[key] = run_task(task, params, logs, timeout=600 if quick else 900)
        if 'error' in R[key]: print(f"  failed ({R[key]['error']}):\n    " + '\n    '.join(R[key]['log_tail']), flush=True)
    return R

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer repetitions and epochs (about 5 minutes)')
    ap.add_argument('--only', nargs='*', help='run only these result keys (for debugging; RESULTS.md then lacks the rest)')
    ap.add_argument('--render', metavar='RESULTS_JSON', help="rewrite RESULTS.md from an earlier run's results.json; measure nothing")
    a = ap.parse_args(argv)
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        R, meta, logs = saved['results'], saved['meta'], Path(a.render).parent
    else:
        ensure_env()
        logs, t0 = Path(tempfile.mkdtemp(prefix='mpify-bench-logs-')), time.perf_counter()
        R = measure(a.quick, a.only, logs)
        meta = dict(quick=a.quick, wall_s=time.perf_counter() - t0, date=time.strftime('%Y-%m-%d %H:%M %Z'), versions=versions())
        (logs / 'results.json').write_text(json.dumps({'results': R, 'meta': meta}))
    print(write_results(build_table(R), R, meta))
    print(f"\nwrote {RESULTS} ({meta['wall_s']:.0f} s of measuring); raw results and child logs in {logs}")
    return 0

if __name__ == '__main__': raise SystemExit(main())
