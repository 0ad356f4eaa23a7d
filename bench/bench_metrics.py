"""What exact metrics cost under DDP (issue 30): `python bench/bench_metrics.py [ROUNDS]` (default 5).

1. The combination alone, per validation epoch, in a real 2-rank gloo group (`in_torchddp`): each rank feeds its shard of
   precomputed batches (rank r: local batches r, r+2, ...) to the metrics as the Recorder does, watched by a
   `MetricTracker` as `ExactMetrics` does, then the shares are exchanged (`all_gather_object`) and combined (replayed).
   Reported per metric set: the bytes one rank's shares pickle to (what it sends), the seconds `accumulate` takes more
   while watched (the inputs kept), and the seconds of the exchange and combination (replays included). Cases: a
   50,000-item, 1,000-class validation set (bs 256) and 1,000 segmentation masks of 96x96 in 5 classes (bs 16).
2. An epoch with a user metric against one without, `learn.ddp(nprocs=2).fit(EPOCHS)`, on the digits demo
   (`mpify_fastai.demo`) and on the tabular benchmark's Learner (`bench_breakdown.make_learner`, 1,000,000 rows):
   rank 0's epoch seconds (before_epoch to after_epoch), its validation's, and its combination's (from a barrier at
   `after_validate` to the end of the DistributedRunner's, which combines), A and B alternating, order swapped each round.
Prints markdown tables and the raw numbers as JSON.
"""
from __future__ import annotations
import json, os, pickle, statistics, sys, tempfile, time
from types import SimpleNamespace
import torch
import torch.nn.functional as F
from fastai.learner import AvgLoss, AvgMetric, Learner, Metric
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import DiceMulti, F1Score, accuracy, foreground_acc
from fastai.torch_core import to_detach
from fastai.callback.core import Callback
from mpify_fastai import in_torchddp
from mpify_fastai.metrics import MetricTracker

# ---------------------------------------------------------------- user metrics, as people write them

class UserAccuracy(Metric):
    "Reads the predictions and targets: correct items over items."
    def reset(self): self.correct, self.n = 0, 0
    def accumulate(self, learn):
        self.correct += int((learn.pred.argmax(-1) == learn.y).sum()); self.n += len(learn.y)
    value = property(lambda self: self.correct / self.n)

class WorstBatchLoss(Metric):
    "Reads the loss only: the largest batch loss."
    def reset(self): self.worst = float('-inf')
    def accumulate(self, learn): self.worst = max(self.worst, float(learn.loss))
    value = property(lambda self: self.worst)

class WorstAbsError(Metric):
    "A regression's largest absolute error (reads predictions and targets)."
    def reset(self): self.worst = 0.
    def accumulate(self, learn): self.worst = max(self.worst, float((learn.pred.view(-1) - learn.y.view(-1)).abs().max()))
    value = property(lambda self: self.worst)

class ClassIoU(Metric):
    "Segmentation: per-class intersection and union kept in a dict of tensors (reads predictions and masks)."
    def reset(self): self.inter, self.union = {}, {}
    def accumulate(self, learn):
        p = learn.pred.argmax(1)
        for c in range(learn.pred.shape[1]):
            a, b = p == c, learn.y == c
            self.inter[c] = self.inter.get(c, 0) + int((a & b).sum()); self.union[c] = self.union.get(c, 0) + int((a | b).sum())
    value = property(lambda self: sum(self.inter[c] / max(1, self.union[c]) for c in self.inter) / len(self.inter))

# ---------------------------------------------------------------- 1. the combination alone

CASES = {'classes': dict(n=50_000, bs=256, c=1000), 'masks': dict(n=1_000, bs=16, c=5, hw=96)}
SETS = {'classes': {"fastai's (AvgLoss, accuracy, F1Score macro)": lambda: [AvgLoss(), AvgMetric(accuracy), F1Score(average='macro')],
                    'a user metric of the loss (WorstBatchLoss)': lambda: [WorstBatchLoss()],
                    'a user metric of pred and y (UserAccuracy)': lambda: [UserAccuracy()]},
        'masks': {"fastai's (AvgLoss, foreground_acc, DiceMulti)": lambda: [AvgLoss(), AvgMetric(foreground_acc), DiceMulti()],
                  'a user metric of pred and y (ClassIoU)': lambda: [ClassIoU()]}}

def _batches(case: str, rank: int, world: int) -> list:
    "This rank's validation batches (local batches rank, rank+world, ...) as the Recorder's metrics see them."
    spec, g = CASES[case], torch.Generator().manual_seed(rank)
    out = []
    for k, start in enumerate(range(0, spec['n'], spec['bs'])):
        if k % world != rank: continue
        n = min(spec['bs'], spec['n'] - start)
        if case == 'classes': y, pred = torch.randint(0, spec['c'], (n,), generator=g), torch.randn(n, spec['c'], generator=g)
        else:
            y = torch.randint(0, spec['c'], (n, spec['hw'], spec['hw']), generator=g)
            pred = torch.randn(n, spec['c'], spec['hw'], spec['hw'], generator=g)
        out.append(SimpleNamespace(pred=pred, y=y, yb=(y,), xb=(pred,), x=pred, loss=F.cross_entropy(pred, y),
                                   to_detach=lambda b, cpu=True, gather=True: to_detach(b, cpu, gather=False),
                                   training=False, iter=k, n_iter=0))
    return out

def _feed(mets, batches, tracker=None) -> float:
    t = time.perf_counter()
    for b in batches:
        if tracker is not None: tracker.batch_begins()
        for m in mets: m.accumulate(b)
    return time.perf_counter() - t

def combine_cost(case: str, reps: int) -> dict:
    "In a worker of a 2-rank group: per metric set, median seconds and bytes of one validation epoch's combination."
    import torch.distributed as dist
    torch.set_num_threads(1)
    batches, out = _batches(case, dist.get_rank(), dist.get_world_size()), {}
    for name, make in SETS[case].items():
        plain, watched, combine, sent = [], [], [], []
        for _ in range(reps):
            mets = make()
            for m in mets: m.reset()
            plain.append(_feed(mets, batches))
            mets = make()
            for m in mets: m.reset()
            tracker = MetricTracker(mets)
            watched.append(_feed(mets, batches, tracker))
            dist.barrier()
            t = time.perf_counter()
            shares = tracker.shares()
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, shares)
            problems = tracker.combine(everyone)
            combine.append(time.perf_counter() - t)
            assert not problems, problems
            sent.append(len(pickle.dumps(shares)))
        med = statistics.median
        out[name] = dict(bytes=med(sent), accumulate=med(plain), watched_extra=med(watched) - med(plain),
                         combine=med(combine), n_batches=len(batches))
    return out

# ---------------------------------------------------------------- 2. an epoch with a user metric and without

class Stamps(Callback):
    "Rank 0 appends `event wall-clock-time` lines to `path` at each epoch's start and end."
    order = 100
    def __init__(self, path: str): self.path = path
    def _stamp(self, what: str):
        if int(os.environ.get('RANK', '0')) == 0:
            with open(self.path, 'a') as f: f.write(f"{what} {time.time()}\n")
    def before_epoch(self): self._stamp('before_epoch')
    def before_validate(self): self._stamp('before_validate')
    def after_validate(self): self._stamp('after_validate')   # after ExactMetrics (11) and the Recorder (50)
    def after_epoch(self): self._stamp('after_epoch')

class CombineStart(Stamps):
    """Stamps as `after_validate` reaches the DistributedRunner (order 11), whose `after_validate` combines the metrics,
    once both ranks are there (a barrier: the span is the combination, not a wait for the slower rank's batches)."""
    order = 10
    def after_validate(self):
        import torch.distributed as dist
        dist.barrier()
        self._stamp('combine_start')
    before_epoch = before_validate = after_epoch = lambda self: None

class CombineEnd(CombineStart):
    order = 12
    def after_validate(self): self._stamp('combine_end')

def _epoch_seconds(learn, epochs: int, path: str) -> tuple[float, float, float]:
    """Rank 0's mean seconds of an epoch, of its validation (batches and the metrics' combination), and of the
    combination alone, in one `learn.ddp(nprocs=2).fit(epochs)`."""
    open(path, 'w').close()
    learn.ddp(nprocs=2).fit(epochs, cbs=[Stamps(path), CombineStart(path), CombineEnd(path)])
    st = [(k, float(v)) for k, v in (line.split() for line in open(path))]
    at = lambda k: [v for kk, v in st if kk == k]
    span = lambda a, b: statistics.mean(y - x for x, y in zip(at(a), at(b)))
    return span('before_epoch', 'after_epoch'), span('before_validate', 'after_validate'), span('combine_start', 'combine_end')

def epoch_ratio(make, user_metric, rounds: int, epochs: int) -> dict:
    "Epoch seconds without (A) and with (B) `user_metric`, alternating (order swapped each round)."
    path = tempfile.mktemp(prefix='mpify-bench-metric-stamps-')
    a_learn, b_learn = make(), make()
    b_learn.metrics = list(b_learn.metrics) + [user_metric]
    _epoch_seconds(a_learn, 1, path)   # the warm server started, as in a session's later calls
    a, b = [], []
    for r in range(rounds):
        for which in ((a_learn, a), (b_learn, b))[::1 if r % 2 == 0 else -1]: which[1].append(_epoch_seconds(which[0], epochs, path))
    os.remove(path)
    return dict(without=[x[0] for x in a], with_=[x[0] for x in b], ratios=[y[0] / x[0] for x, y in zip(a, b)],
                valid_without=[x[1] for x in a], valid_with=[x[1] for x in b],
                combine_without=[x[2] for x in a], combine_with=[x[2] for x in b], loadavg=os.getloadavg())

def digits_learner():
    from mpify_fastai.demo import digits_cnn, digits_dls
    return Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)

def tabular_learner_1m():
    from bench_breakdown import make_learner
    return make_learner(1_000_000)

def main(rounds: int) -> dict:
    res = dict(loadavg_start=os.getloadavg(), cpus=os.cpu_count())
    for case in CASES: res[case] = in_torchddp(2, combine_cost, case, 5, gather=0)
    res['digits'] = epoch_ratio(digits_learner, UserAccuracy(), rounds, 3)
    res['tabular'] = epoch_ratio(tabular_learner_1m, WorstAbsError(), max(2, rounds // 2), 1)
    res['loadavg_end'] = os.getloadavg()
    return res

def tables(r: dict) -> str:
    out = ['| case | metrics | sent per rank | accumulate (plain) | + watching | exchange + combine |', '|---|---|---|---|---|---|']
    for case in CASES:
        what = ('50,000 items x 1,000 classes, bs 256' if case == 'classes' else '1,000 masks 96x96, 5 classes, bs 16')
        for name, v in r[case].items():
            out.append(f"| {what} | {name} | {v['bytes'] / 2**20:.2f} MiB | {v['accumulate']:.3f} s | "
                       f"{v['watched_extra']:+.3f} s | {v['combine']:.3f} s |")
    out += ['', '| Learner | epoch without (median) | with a user metric (median) | ratio per round (median, range) '
            '| validation without / with (medians) | combination without / with (medians) | 1-min load after |',
            '|---|---|---|---|---|---|---|']
    for key, what in (('digits', 'digits demo CNN, UserAccuracy, fit(3)'), ('tabular', '1M-row tabular, WorstAbsError, fit(1)')):
        v, med = r[key], statistics.median
        out.append(f"| {what} | {med(v['without']):.3f} s | {med(v['with_']):.3f} s | {med(v['ratios']):.3f}x "
                   f"({min(v['ratios']):.3f}-{max(v['ratios']):.3f}, {len(v['ratios'])} rounds) | "
                   f"{med(v['valid_without']):.3f} s / {med(v['valid_with']):.3f} s | "
                   f"{med(v['combine_without']) * 1e3:.1f} ms / {med(v['combine_with']) * 1e3:.1f} ms | {v['loadavg'][0]:.1f} |")
    return '\n'.join(out)

if __name__ == '__main__':
    res = main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
    print(tables(res)); print(json.dumps(res))
