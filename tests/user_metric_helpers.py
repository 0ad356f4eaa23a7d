"""A user's metrics as people write them (issue 30), one per shape of state: numbers that add and numbers that do not
(max, min, last, first, product), sets, Counters, OrderedDicts, defaultdicts, tuples, named tuples, deques, pandas
Series and DataFrames, numpy and torch of several dtypes, nested containers, order-dependent values, metrics that read
the inputs or the batch index; and metrics that cannot be made exact (they read the model, another callback, or draw
random numbers). The workers import them from here by reference."""
from __future__ import annotations
import bisect, os
from collections import Counter, OrderedDict, defaultdict, deque, namedtuple
from functools import partial
import numpy as np, pandas as pd
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.learner import AvgMetric, Learner, Metric
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import AccumMetric
from fastai.optimizer import SGD
from fastai_helpers import digits_dsets, digits_xy
from metric_helpers import BS, N_TRAIN, N_VALID, LastBatchAccuracy, NoneStart, _model

def _acc(learn) -> float: return float((learn.pred.argmax(-1) == learn.y).float().mean())
def _preds(learn) -> list[int]: return learn.pred.argmax(-1).tolist()
def _losses(learn) -> torch.Tensor: return F.cross_entropy(learn.pred, learn.y, reduction='none')

class SumLoss(Metric):
    def reset(self): self.total, self.n = 0., 0
    def accumulate(self, learn): self.total += float(learn.loss) * len(learn.y); self.n += len(learn.y)
    value = property(lambda self: self.total / self.n)

class MaxBatchLoss(Metric):
    def reset(self): self.worst = float('-inf')
    def accumulate(self, learn): self.worst = max(self.worst, float(learn.loss))
    value = property(lambda self: self.worst)

class MaxItemLoss(Metric):
    def reset(self): self.worst = 0.
    def accumulate(self, learn): self.worst = max(self.worst, float(_losses(learn).max()))
    value = property(lambda self: self.worst)

class MinBatchAccuracy(Metric):
    def reset(self): self.best = float('inf')
    def accumulate(self, learn): self.best = min(self.best, _acc(learn))
    value = property(lambda self: self.best)

class LastBatchSize(Metric):
    def reset(self): self.last = 0
    def accumulate(self, learn): self.last = len(learn.yb[0])
    value = property(lambda self: float(self.last))

class FirstBatchLoss(Metric):
    def reset(self): self.first = None
    def accumulate(self, learn):
        if self.first is None: self.first = float(learn.loss)
    value = property(lambda self: self.first)

class ProductOfAccuracies(Metric):
    def reset(self): self.prod = 1.
    def accumulate(self, learn): self.prod *= 1 + _acc(learn)
    value = property(lambda self: self.prod)

class ConfusedPairs(Metric):
    "A set of (prediction, target) pairs that were wrong."
    def reset(self): self.pairs = set()
    def accumulate(self, learn): self.pairs |= {(p, t) for p, t in zip(_preds(learn), learn.y.tolist()) if p != t}
    value = property(lambda self: float(sum(p * 10 + t for p, t in self.pairs) + 1000 * len(self.pairs)))

class PredCounter(Metric):
    "A Counter read with most_common(): ties come in insertion order, so its value depends on the batch order."
    def reset(self): self.counts = Counter()
    def accumulate(self, learn): self.counts.update(_preds(learn))
    value = property(lambda self: float(sum((i + 1) * k for i, (k, _) in enumerate(self.counts.most_common()))
                                        + self.counts.most_common(1)[0][1]))

class FirstSeenOrder(Metric):
    "An OrderedDict of classes in the order they were first predicted."
    def reset(self): self.order = OrderedDict()
    def accumulate(self, learn):
        for p in _preds(learn): self.order.setdefault(p, len(self.order))
    value = property(lambda self: float(''.join(str(k) for k in self.order)))

class LossesByClass(Metric):
    "A defaultdict(list) of per-item losses by target."
    def reset(self): self.by_class = defaultdict(list)
    def accumulate(self, learn):
        for t, l in zip(learn.y.tolist(), _losses(learn).tolist()): self.by_class[t].append(l)
    value = property(lambda self: float(np.median(self.by_class[3]) + np.mean([v[0] for v in self.by_class.values()])))

class TupleTotals(Metric):
    def reset(self): self.t = (0., 0)
    def accumulate(self, learn): self.t = (self.t[0] + float(_losses(learn).sum()), self.t[1] + len(learn.y))
    value = property(lambda self: self.t[0] / self.t[1])

Stats = namedtuple('Stats', 'correct seen')

class NamedStats(Metric):
    def reset(self): self.s = Stats(0, 0)
    def accumulate(self, learn):
        self.s = Stats(self.s.correct + int((learn.pred.argmax(-1) == learn.y).sum()), self.s.seen + len(learn.y))
    value = property(lambda self: self.s.correct / self.s.seen)

class RecentLosses(Metric):
    "A deque of the last 4 batch losses, weighed by position."
    def reset(self): self.recent = deque(maxlen=4)
    def accumulate(self, learn): self.recent.append(float(learn.loss))
    value = property(lambda self: sum((i + 1) * v for i, v in enumerate(self.recent)))

class GrownSeries(Metric):
    "A pandas Series of per-item losses grown per batch; every 7th item read: order matters."
    def reset(self): self.s = pd.Series(dtype=float)
    def accumulate(self, learn):
        new = pd.Series(_losses(learn).tolist())
        self.s = new if self.s.empty else pd.concat([self.s, new], ignore_index=True)
    value = property(lambda self: float(self.s.iloc[::7].sum()))

class GrownFrame(Metric):
    "A pandas DataFrame of rows (prediction, target, loss) grown per batch."
    def reset(self): self.df = None
    def accumulate(self, learn):
        new = pd.DataFrame({'pred': _preds(learn), 'targ': learn.y.tolist(), 'loss': _losses(learn).tolist()})
        self.df = new if self.df is None else pd.concat([self.df, new], ignore_index=True)
    value = property(lambda self: float(self.df.groupby('targ')['loss'].mean().std() + (self.df.pred == self.df.targ).mean()
                                        + self.df.loss.iloc[-5:].sum()))

class SeriesCounts(Metric):
    "A pandas Series of prediction counts, one entry per class."
    def reset(self): self.counts = pd.Series(0, index=range(10))
    def accumulate(self, learn): self.counts = self.counts.add(pd.Series(_preds(learn)).value_counts(), fill_value=0)
    value = property(lambda self: float(self.counts.values @ np.arange(1, 11)))

class NestedLog(Metric):
    "A dict of a list of tuples and a dict of counts."
    def reset(self): self.log = {'batches': [], 'sizes': {}}
    def accumulate(self, learn):
        self.log['batches'].append((float(learn.loss), _acc(learn)))
        self.log['sizes'][len(learn.y)] = self.log['sizes'].get(len(learn.y), 0) + 1
    value = property(lambda self: self.log['batches'][-1][0] + 3 * self.log['batches'][1][1]
                     + sum(k * v for k, v in self.log['sizes'].items()))

class RowsOfDicts(Metric):
    "A list of one dict per batch; the first five read."
    def reset(self): self.rows = []
    def accumulate(self, learn): self.rows.append({'n': len(learn.y), 'acc': _acc(learn)})
    value = property(lambda self: sum(r['n'] * r['acc'] for r in self.rows[:5]) / sum(r['n'] for r in self.rows[:5]))

class EmaLoss(Metric):
    def reset(self): self.ema = 0.
    def accumulate(self, learn): self.ema = .7 * self.ema + .3 * float(learn.loss)
    value = property(lambda self: self.ema)

class PositionWeightedLoss(Metric):
    "Its own batch counter: order matters."
    def reset(self): self.i, self.total = 0, 0.
    def accumulate(self, learn): self.i += 1; self.total += self.i * float(learn.loss)
    value = property(lambda self: self.total / self.i)

class IterWeightedLoss(Metric):
    "Reads learn.iter and learn.n_iter."
    def reset(self): self.total = 0.
    def accumulate(self, learn): self.total += float(learn.loss) * (learn.iter + 1) / learn.n_iter
    value = property(lambda self: self.total)

class InputsOfErrors(Metric):
    "Reads the inputs (learn.xb): mean pixel of the misclassified images."
    def reset(self): self.total, self.n = 0., 0
    def accumulate(self, learn):
        wrong = learn.pred.argmax(-1) != learn.y
        self.total += float(learn.xb[0][wrong].sum()); self.n += int(wrong.sum())
    value = property(lambda self: self.total / self.n)

class BrightestBatch(Metric):
    "Reads learn.x: the largest batch mean intensity."
    def reset(self): self.top = 0.
    def accumulate(self, learn): self.top = max(self.top, float(learn.x.mean()))
    value = property(lambda self: self.top)

class Int8Counts(Metric):
    "numpy int8 counts that wrap past 127, as locally."
    def reset(self): self.c = np.zeros(10, np.int8)
    def accumulate(self, learn): self.c += np.bincount(_preds(learn), minlength=10)[:10].astype(np.int8)
    value = property(lambda self: float(self.c.astype(np.int64) @ np.arange(1, 11)))

class WrongPositions(Metric):
    "A numpy bool mask of positions in a batch that were ever wrong in a batch with loss above 0.2."
    def reset(self): self.mask = np.zeros(BS, bool)
    def accumulate(self, learn):
        if float(learn.loss) > .2:
            w = (learn.pred.argmax(-1) != learn.y).numpy()
            self.mask[:len(w)] |= w
    value = property(lambda self: float(self.mask @ (2 ** np.arange(BS))))

class HalfConfusion(Metric):
    "A float16 torch confusion matrix."
    def reset(self): self.cm = torch.zeros(10, 10, dtype=torch.float16)
    def accumulate(self, learn):
        for p, t in zip(_preds(learn), learn.y.tolist()): self.cm[t, p] += 1
    value = property(lambda self: float(self.cm.diagonal().float() @ torch.arange(1., 11.)))

class ComplexPhase(Metric):
    "A complex64 torch accumulator."
    def reset(self): self.z = torch.zeros((), dtype=torch.complex64)
    def accumulate(self, learn): self.z = self.z + torch.exp(1j * learn.pred.max(-1).values).sum()
    value = property(lambda self: float(self.z.abs()))

class InsortedLosses(Metric):
    "A sorted list kept with bisect.insort."
    def reset(self): self.sorted = []
    def accumulate(self, learn):
        for l in _losses(learn).tolist(): bisect.insort(self.sorted, l)
    value = property(lambda self: self.sorted[len(self.sorted) // 3])

class GrownArray(Metric):
    "A numpy array grown with np.append; the first half read."
    def reset(self): self.a = np.array([])
    def accumulate(self, learn): self.a = np.append(self.a, _losses(learn).numpy())
    value = property(lambda self: float(self.a[:len(self.a) // 2].mean()))

def _acc_fn(pred, targ): return (pred.argmax(-1) == targ).float().mean()

class MaxAvgMetric(AvgMetric):
    "A subclass of fastai's AvgMetric whose accumulate keeps the worst batch."
    def __init__(self): super().__init__(_acc_fn)
    def reset(self): self.low = 1.
    def accumulate(self, learn): self.low = min(self.low, float(learn.to_detach(self.func(learn.pred, *learn.yb))))
    value = property(lambda self: self.low)
    name = property(lambda self: 'max_avg_metric')

class LastItemsAccum(AccumMetric):
    "A subclass of fastai's AccumMetric whose value reads the last 20 predictions."
    def __init__(self): super().__init__(_acc_fn, flatten=False)
    @property
    def value(self): return float(_acc_fn(torch.cat(self.preds)[-20:], torch.cat(self.targs)[-20:]))
    name = property(lambda self: 'last_items_accum')

EXACT = [SumLoss, MaxBatchLoss, MaxItemLoss, MinBatchAccuracy, LastBatchSize, FirstBatchLoss, ProductOfAccuracies,
         ConfusedPairs, PredCounter, FirstSeenOrder, LossesByClass, TupleTotals, NamedStats, RecentLosses, GrownSeries,
         GrownFrame, SeriesCounts, NestedLog, RowsOfDicts, EmaLoss, PositionWeightedLoss, IterWeightedLoss,
         InputsOfErrors, BrightestBatch, Int8Counts, WrongPositions, HalfConfusion, ComplexPhase, InsortedLosses,
         GrownArray, MaxAvgMetric, LastItemsAccum, LastBatchAccuracy, NoneStart]

# what a training epoch gives alike locally and under DDP, whose ranks' training batches are not a local run's batches
PER_ITEM = [SumLoss, MaxItemLoss, ConfusedPairs, SeriesCounts, NamedStats, TupleTotals, Int8Counts, InsortedLosses,
            HalfConfusion, InputsOfErrors]

# ---------------------------------------------------------------- what cannot be made exact, and what it reads

class ReadsModel(Metric):
    def reset(self): self.total = 0.
    def accumulate(self, learn): self.total += float(learn.model[1].weight.abs().sum()) * float(learn.loss)
    value = property(lambda self: self.total)

class ReadsRecorder(Metric):
    def reset(self): self.total = 0.
    def accumulate(self, learn): self.total += float(learn.loss) + len(learn.recorder.metric_names)
    value = property(lambda self: self.total)

class DrawsRandom(Metric):
    def reset(self): self.total = 0.
    def accumulate(self, learn): self.total += float(learn.loss) * float(torch.rand(()))
    value = property(lambda self: self.total)

class LateInputReader(Metric):
    "Reads the inputs only once it has seen 120 items: no rank's shard gets there live, so the replay meets learn.xb unkept."
    def reset(self): self.n, self.extra = 0, 0.
    def accumulate(self, learn):
        self.n += len(learn.y)
        if self.n > 120: self.extra += float(learn.xb[0].mean())
    value = property(lambda self: self.n + self.extra)

UNEXACT = {ReadsModel: 'it reads learn.model', ReadsRecorder: 'it reads learn.recorder',
           DrawsRandom: 'it draws from a global random generator',
           LateInputReader: "replaying its accumulate raised _NotKept: learn.xb, which it did not read while the batch was seen"}

def user_learner(metrics: list, n_valid: int = N_VALID, lr: float = 0.1) -> Learner:
    "A digits classifier (unshuffled validation of `n_valid` items, bs 16) with `metrics`."
    train, valid = digits_dsets(N_TRAIN, n_valid)
    dls = DataLoaders.from_dsets(train, valid, bs=BS, shuffle=False)
    return Learner(dls, _model('multiclass'), loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.), wd=0.,
                   lr=lr, metrics=metrics)

class ReplayFailsOnRank1(Metric):
    "A sum whose replay raises on rank 1 only (it reads the RANK variable): a failure that one rank alone meets."
    def reset(self): self.total = 0.
    def accumulate(self, learn):
        if os.environ.get('RANK') == '1' and type(learn).__name__ == '_Replayed': raise RuntimeError('rank 1 only')
        self.total += float(learn.loss)
    value = property(lambda self: self.total)
