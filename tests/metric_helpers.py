"""Metrics of every accumulator shape a user writes, and one small Learner per kind of target with every metric
`fastai.metrics` exports for it: the workers import them from here by reference."""
from __future__ import annotations
from functools import partial
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Metric
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, MSELossFlat
from fastai.optimizer import SGD
import fastai.metrics as fm
from sklearn import metrics as skm
from fastai_helpers import digits_xy

# ---------------------------------------------------------------- a user's metrics, one per accumulator shape

def _item_losses(learn) -> torch.Tensor:
    return F.cross_entropy(learn.pred, learn.y, reduction='none')

class PerBatchMedianLoss(Metric):
    "The usual custom metric: one number per batch appended to a list (the issue's MedianLoss)."
    def reset(self): self.vals = []
    def accumulate(self, learn): self.vals.append(float(learn.loss))
    @property
    def value(self): return float(np.median(self.vals))

class BatchesSeen(Metric):
    "Counts batches as a list of ones: equal-length lists on every rank that must concatenate, not add."
    def reset(self): self.seen = []
    def accumulate(self, learn): self.seen.append(1.0)
    @property
    def value(self): return float(sum(self.seen))

class PerItemMedian(Metric):
    "Per-item numbers extended into a list."
    def reset(self): self.vals = []
    def accumulate(self, learn): self.vals.extend(_item_losses(learn).tolist())
    @property
    def value(self): return float(np.median(self.vals))

class OrderedPredictions(Metric):
    "Tensors appended per batch, kept for a score that depends on their order: each item's class weighed by its position."
    def reset(self): self.preds = []
    def accumulate(self, learn): self.preds.append(learn.pred.argmax(-1).cpu())
    @property
    def value(self):
        p = torch.cat(self.preds).double()
        return float((p * torch.arange(1, len(p) + 1)).sum() / len(p) ** 2)

class GrownTensor(Metric):
    "An empty tensor that `accumulate` grows with torch.cat; the value reads its first half: order matters."
    def reset(self): self.losses = torch.tensor([])
    def accumulate(self, learn): self.losses = torch.cat([self.losses, _item_losses(learn).cpu()])
    @property
    def value(self): return float(self.losses[:len(self.losses) // 2 + 1].mean())

class ClassCounts(Metric):
    "A dict of counts keyed by class, empty after reset."
    def reset(self): self.counts = {}
    def accumulate(self, learn):
        for c in learn.y.tolist(): self.counts[c] = self.counts.get(c, 0) + 1
    @property
    def value(self): return float(self.counts.get(1, 0) * 100 + self.counts.get(2, 0))

class ArrayCounts(Metric):
    "A numpy array of per-class counts of the predictions."
    def reset(self): self.hits = np.zeros(10)
    def accumulate(self, learn): self.hits += np.bincount(learn.pred.argmax(-1).cpu().numpy(), minlength=10)[:10]
    @property
    def value(self): return float(self.hits @ np.arange(1, 11) / self.hits.sum())

class IntCounter(Metric):
    "An int counter of correct items."
    def reset(self): self.correct = 0
    def accumulate(self, learn): self.correct += int((learn.pred.argmax(-1) == learn.y).sum())
    @property
    def value(self): return float(self.correct)

class FixedCounts(Metric):
    "A fixed-length list of counts (CorpusBLEU's shape): added element-wise."
    def reset(self): self.counts = [0, 0, 0]
    def accumulate(self, learn):
        self.counts = [self.counts[0] + len(learn.y), self.counts[1] + int((learn.y == 0).sum()), self.counts[2] + 1]
    @property
    def value(self): return float(self.counts[0] * 10000 + self.counts[1] * 100 + self.counts[2])

SHAPES = [PerBatchMedianLoss, BatchesSeen, PerItemMedian, OrderedPredictions, GrownTensor, ClassCounts, ArrayCounts,
          IntCounter, FixedCounts]

class LastBatchAccuracy(Metric):
    "reset() assigns nothing: no whole-set value."
    def reset(self): pass
    def accumulate(self, learn): self.acc = float((learn.pred.argmax(-1) == learn.y).float().mean())
    @property
    def value(self): return self.acc

class NoneStart(Metric):
    "reset() leaves None: how it adds up is unknown."
    def reset(self): self.total = None
    def accumulate(self, learn): self.total = float(learn.loss) + (self.total or 0.)
    @property
    def value(self): return self.total

# ---------------------------------------------------------------- one Learner per kind of target

N_VALID, N_TRAIN, BS = 203, 256, 16   # 203 is a multiple of neither 16 nor 16 * 2, 3 or 4

class TwoPartLoss(nn.Module):
    "Cross-entropy that keeps its parts as attributes, for fastai's `LossMetrics`."
    def forward(self, pred, targ):
        self.ce = F.cross_entropy(pred, targ)
        self.sq = (pred.softmax(-1) ** 2).sum(-1).mean()
        return self.ce + 0 * self.sq
    def activation(self, x): return F.softmax(x, -1)
    def decodes(self, x): return x.argmax(-1)

def _targets(kind: str, X: torch.Tensor, y: torch.Tensor):
    "The target of each digit for a kind of task."
    if kind in ('multiclass', 'custom'): return y
    if kind == 'binary': return (y >= 5).long()
    if kind == 'multilabel': return torch.stack([y >= 5, y % 2 == 1, (y == 0) | (y >= 8)], 1).float()
    if kind == 'regression': return (y.float() + 1.)[:, None]
    if kind == 'segmentation': return (X[:, 0] > .3).long() + (X[:, 0] > .7).long()   # 3 classes per pixel
    if kind == 'sequence': return (X[:, 0, 3] * 16).round().long()                     # row 3's 8 pixels as tokens 0..16
    raise ValueError(kind)

def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == 'segmentation': return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    if kind == 'sequence': return nn.Sequential(nn.Flatten(), nn.Linear(64, 8 * 17), nn.Unflatten(1, (8, 17)))
    out = {'multiclass': 10, 'custom': 10, 'binary': 2, 'multilabel': 3, 'regression': 1}[kind]
    head = [nn.Softplus()] if kind == 'regression' else []   # msle needs positive predictions
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, out), *head)

_LOSS = {'multiclass': CrossEntropyLossFlat, 'binary': CrossEntropyLossFlat, 'multilabel': BCEWithLogitsLossFlat,
         'regression': MSELossFlat, 'segmentation': partial(CrossEntropyLossFlat, axis=1), 'sequence': CrossEntropyLossFlat,
         'custom': TwoPartLoss}

def _bin_pos(p, t): return float(((p[:, 1] > p[:, 0]).float() == t.float()).float().mean())   # AccumMetric over all items

def _log_loss(): return fm.skm_to_fastai(skm.log_loss, activation=fm.ActivationType.Softmax, is_class=False,
                                         flatten=False, labels=list(range(10)))

# Every metric fastai.metrics exports: (its name there, the target it needs, how it is built: defaults or as shown).
TABLE = [
    ('accuracy', 'multiclass', lambda: fm.accuracy), ('error_rate', 'multiclass', lambda: fm.error_rate),
    ('top_k_accuracy', 'multiclass', lambda: fm.top_k_accuracy), ('BalancedAccuracy', 'multiclass', fm.BalancedAccuracy),
    ('CohenKappa', 'multiclass', fm.CohenKappa), ('F1Score', 'multiclass', lambda: fm.F1Score(average='macro')),
    ('FBeta', 'multiclass', lambda: fm.FBeta(beta=2, average='macro')), ('HammingLoss', 'multiclass', fm.HammingLoss),
    ('Jaccard', 'multiclass', lambda: fm.Jaccard(average='macro')),
    ('Precision', 'multiclass', lambda: fm.Precision(average='macro')),
    ('Recall', 'multiclass', lambda: fm.Recall(average='macro')), ('RocAuc', 'multiclass', fm.RocAuc),
    ('MatthewsCorrCoef', 'multiclass', fm.MatthewsCorrCoef), ('Perplexity', 'multiclass', fm.Perplexity),
    ('perplexity', 'multiclass', lambda: fm.perplexity),
    ('skm_to_fastai', 'multiclass', lambda: fm.skm_to_fastai(skm.accuracy_score)), ('skm_to_fastai', 'multiclass', _log_loss),
    ('APScoreBinary', 'binary', fm.APScoreBinary), ('RocAucBinary', 'binary', fm.RocAucBinary),
    ('BrierScore', 'binary', fm.BrierScore), ('F1Score', 'binary', fm.F1Score), ('FBeta', 'binary', lambda: fm.FBeta(beta=.5)),
    ('Precision', 'binary', fm.Precision), ('Recall', 'binary', fm.Recall), ('Jaccard', 'binary', fm.Jaccard),
    ('MatthewsCorrCoef', 'binary', fm.MatthewsCorrCoef), ('AccumMetric', 'binary', lambda: fm.AccumMetric(_bin_pos, flatten=False)),
    ('accuracy_multi', 'multilabel', lambda: fm.accuracy_multi), ('APScoreMulti', 'multilabel', fm.APScoreMulti),
    ('BrierScoreMulti', 'multilabel', fm.BrierScoreMulti), ('F1ScoreMulti', 'multilabel', fm.F1ScoreMulti),
    ('FBetaMulti', 'multilabel', lambda: fm.FBetaMulti(beta=2)), ('HammingLossMulti', 'multilabel', fm.HammingLossMulti),
    ('JaccardMulti', 'multilabel', fm.JaccardMulti), ('PrecisionMulti', 'multilabel', fm.PrecisionMulti),
    ('RecallMulti', 'multilabel', fm.RecallMulti), ('RocAucMulti', 'multilabel', fm.RocAucMulti),
    ('rmse', 'regression', lambda: fm.rmse), ('exp_rmspe', 'regression', lambda: fm.exp_rmspe),
    ('mse', 'regression', lambda: fm.mse), ('mae', 'regression', lambda: fm.mae), ('msle', 'regression', lambda: fm.msle),
    ('ExplainedVariance', 'regression', fm.ExplainedVariance), ('R2Score', 'regression', fm.R2Score),
    ('PearsonCorrCoef', 'regression', fm.PearsonCorrCoef), ('SpearmanCorrCoef', 'regression', fm.SpearmanCorrCoef),
    ('foreground_acc', 'segmentation', lambda: fm.foreground_acc), ('Dice', 'segmentation', fm.Dice),
    ('DiceMulti', 'segmentation', fm.DiceMulti), ('JaccardCoeff', 'segmentation', fm.JaccardCoeff),
    ('JaccardCoeffMulti', 'segmentation', fm.JaccardCoeffMulti),
    ('CorpusBLEUMetric', 'sequence', lambda: fm.CorpusBLEUMetric(vocab_sz=17)),
    ('LossMetrics', 'custom', lambda: fm.LossMetrics(['ce', 'sq'])), ('accuracy', 'custom', lambda: fm.accuracy),
] + [(m.__name__, 'custom', m) for m in SHAPES]

KINDS = list(dict.fromkeys(kind for _, kind, _ in TABLE))

def metrics_for(kind: str) -> list:
    "The metrics of `TABLE` for `kind`, built anew (LossMetrics builds several)."
    return [x for _, k, make in TABLE if k == kind for x in (lambda m: m if isinstance(m, list) else [m])(make())]

# What the table leaves out, and why.
LEFT_OUT = {
    'optim_metric': 'a function decorator that searches an argument, not a metric',
    'LossMetric': 'built by LossMetrics, checked there (custom)',
    'MatthewsCorrCoefMulti': "fails in a local validate(): scikit-learn's matthews_corrcoef refuses multilabel targets",
}

def metric_learner(kind: str) -> Learner:
    "A Learner over the digits with `kind` targets and every metric `TABLE` lists for them."
    X, y = digits_xy()
    t = _targets(kind, X, y)
    ds = list(zip(X, t))
    dls = DataLoaders.from_dsets(ds[N_VALID:N_VALID + N_TRAIN], ds[:N_VALID], bs=BS, shuffle=False)
    return Learner(dls, _model(kind), loss_func=_LOSS[kind](), opt_func=partial(SGD, mom=0.), wd=0., lr=0.1,
                   metrics=metrics_for(kind))
