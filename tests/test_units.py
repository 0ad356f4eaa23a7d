"""Fast in-process unit tests of the fastai side: dataloader sharding, metric combining, the progress display, history
merging, moving a Learner's state, the epoch checkpoint and the worker's Learner. No worker processes and no
process group: ranks are faked through arguments or the RANK/WORLD_SIZE environment, as fastai's own tests do."""
from __future__ import annotations
import math, stat, subprocess, sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger, ProgressCallback
from fastai.data.load import DataLoader
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss, Learner, Metric, ValueMetric
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import (BalancedAccuracy, Dice, DiceMulti, F1Score, JaccardCoeff, JaccardCoeffMulti, Perplexity,
                            accuracy)
from fastai.optimizer import Adam
from fastai.torch_core import to_detach
from fastcore.basics import noop

import helpers
from fastai_helpers import digits_dls_plain, mlp, params_of, sgd_learner
from metric_helpers import SHAPES, BatchesSeen, IntCounter, LastBatchAccuracy, NoneStart, PerBatchMedianLoss
from mpify_fastai.metrics import ADD, GROW, MetricTracker, accumulator_kinds
from mpify_fastai.sharding import share_loader_workers, shard_dl, unshard_dl
from mpify_fastai.errors import LaunchError
from mpify_fastai.progress import BarStarted, BatchDone, EpochStarted, FitEnded, FitStarted, ProgressDisplay, RowLogged
from mpify_fastai.recovery import EpochCheckpoint, merged_history, resume_callbacks
from mpify_fastai.state import apply_result, learner_result
from mpify_fastai.training import is_rank0_only, worker_learner

# ---------------------------------------------------------------- shard_dl / unshard_dl

def _items(dl) -> list[int]: return [int(i) for b in dl for i in b]

@pytest.mark.parametrize('n,world', [(10, 3), (10, 1), (7, 2), (2, 3)])
def test_shard_dl_unpadded_ranks_split_one_epoch(n, world):
    "Without padding, ranks sharing a seed draw disjoint shares of one shuffled epoch, `n` and iteration included."
    shares, drawn = [], []
    for rank in range(world):
        dl = DataLoader(list(range(n)), bs=4, shuffle=True)
        shard_dl(dl, rank, world, pad=False, seed=123)
        idxs = dl.get_idxs()
        assert dl.n == len(range(rank, n, world)) == len(idxs)
        shares.append(idxs)
        items = _items(dl)
        assert len(items) == dl.n and len(dl) == math.ceil(dl.n / 4)
        drawn.append(items)
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert sorted(i for s in drawn for i in s) == list(range(n))
    full = [shares[i % world][i // world] for i in range(n)]     # the shared shuffled order, rank r has full[r::world]
    assert sorted(full) == list(range(n))
    if n >= 7: assert full != list(range(n))                     # shuffled

@pytest.mark.parametrize('n,world', [(10, 3), (10, 1), (7, 2), (2, 3)])
def test_shard_dl_padded_ranks_equal_length(n, world):
    "With padding, every rank has ceil(n/world) indices; together one epoch plus repeats of its first indices."
    per = -(-n // world)
    shares = []
    for rank in range(world):
        dl = DataLoader(list(range(n)), bs=3, shuffle=True)
        shard_dl(dl, rank, world, pad=True, seed=7)
        assert dl.n == per
        idxs = dl.get_idxs()
        assert len(idxs) == per and len(_items(dl)) == per
        shares.append(idxs)
    full = [shares[i % world][i // world] for i in range(per * world)]
    assert sorted(full[:n]) == list(range(n))
    assert full[n:] == full[:len(full) - n]

def test_shard_dl_iteration_gives_rank_items_and_unshard_restores():
    "A sharded loader yields exactly its rank's items (same on every rank for one seed); `unshard_dl` gives the whole epoch back."
    dl = DataLoader(list(range(10)), bs=4, shuffle=True)
    orig_rng = dl.rng
    saved = shard_dl(dl, 1, 3, pad=False, seed=5)
    assert dl.n == 3 and 'get_idxs' in dl.__dict__
    first = _items(dl)
    dl2 = DataLoader(list(range(10)), bs=4, shuffle=True)
    shard_dl(dl2, 1, 3, pad=False, seed=5)
    assert _items(dl2) == first and len(first) == 3        # same seed: same share on another loader object
    others = [DataLoader(list(range(10)), bs=4, shuffle=True) for _ in range(2)]
    for r, o in zip((0, 2), others): shard_dl(o, r, 3, pad=False, seed=5)
    assert sorted(first + _items(others[0]) + _items(others[1])) == list(range(10))
    unshard_dl(dl, saved)
    assert dl.n == 10 and 'get_idxs' not in dl.__dict__ and dl.rng is orig_rng
    assert len(dl) == 3 and sorted(dl.get_idxs()) == list(range(10)) and sorted(_items(dl)) == list(range(10))

def test_shard_dl_to_detach_does_not_gather(monkeypatch):
    "On a sharded loader the Learner's `to_detach` never gathers (WORLD_SIZE=2, no group); unsharded it would, and raises."
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')
    learn = sgd_learner(digits_dls_plain(10, 4, bs=4), mlp(0))
    learn.dl = learn.dls.valid
    x = torch.arange(3.).requires_grad_()
    saved = shard_dl(learn.dl, 1, 2, pad=False, seed=0)
    out = learn.to_detach(x)
    assert not out.requires_grad and torch.equal(out, torch.arange(3.))
    unshard_dl(learn.dl, saved)
    assert 'to_detach' not in learn.dl.__dict__
    with pytest.raises(ValueError, match='process group'): learn.to_detach(x)

# ---------------------------------------------------------------- MetricTracker: combining by what reset() leaves

N_MET = 23

def _metric_data():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(N_MET, 4, generator=g)
    y = torch.randint(0, 4, (N_MET,), generator=g)
    pred[y == 1, 1] += 1.   # a better than chance classifier, so F1 and balanced accuracy are not degenerate
    return pred, y

def _make_metrics():
    return [AvgMetric(accuracy), AvgLoss(), F1Score(average='macro'), BalancedAccuracy()]

def _batches(pred, y, bs):
    "The local run's batches of (pred, y), as a Learner exposes them during validation."
    for i in range(0, len(y), bs):
        p, t = pred[i:i + bs], y[i:i + bs]
        yield SimpleNamespace(pred=p, yb=(t,), y=t, loss=F.cross_entropy(p, t), to_detach=to_detach)

def _accumulate(mets, batches) -> MetricTracker:
    "Feed `mets` `batches` as the Recorder does, under a tracker that marks where each batch begins."
    for m in mets: m.reset()
    tracker = MetricTracker(mets)
    for b in batches:
        tracker.batch_begins()
        for m in mets: m.accumulate(b)
    return tracker

def _local_and_ranks(make, pred, y, world, bs=4):
    "One local run over every batch, and `world` ranks each taking whole batches r, r+world, ... as validation does."
    local = list(_batches(pred, y, bs))
    whole = make()
    _accumulate(whole, local)
    ranks = [_accumulate(make(), local[r::world]) for r in range(world)]
    return whole, ranks

def _combine_all(trackers: list[MetricTracker]) -> list[list[str]]:
    shares = [t.shares() for t in trackers]
    return [list(t.combine(shares).values()) for t in trackers]

def _value(m) -> float: return float(m.value)

@pytest.mark.filterwarnings('ignore:y_pred contains classes not in y_true')   # a shard alone, on purpose
@pytest.mark.parametrize('world', [2, 3])
def test_combined_metric_shares_equal_whole_set(world):
    "Combining every rank's shares gives each metric its whole-set value, the same on every rank."
    pred, y = _metric_data()
    whole, ranks = _local_and_ranks(_make_metrics, pred, y, world)
    whole = [_value(m) for m in whole]
    assert any(abs(_value(m) - w) > 1e-3 for t in ranks for m, w in zip(t.mets, whole))   # a shard alone is not the answer
    shares = ranks[0].shares()
    assert [sorted(s.values) for s in shares] == [['count', 'total'], ['count', 'total'], ['preds', 'targs'], ['preds', 'targs']]
    assert ranks[0].kinds[2] == {'preds': GROW, 'targs': GROW} and ranks[0].kinds[0] == {'total': ADD, 'count': ADD}
    assert _combine_all(ranks) == [[]] * world
    combined = [[_value(m) for m in t.mets] for t in ranks]
    for vals in combined:
        assert vals == combined[0]
        assert vals == pytest.approx(whole, abs=1e-6)

def test_combine_metric_shares_with_an_empty_rank():
    "A rank that saw no batch adds nothing: the others' shares still combine to the whole-set value."
    pred, y = _metric_data()
    whole, (full,) = _local_and_ranks(_make_metrics, pred, y, 1)
    empty = _accumulate(_make_metrics(), [])
    shares = empty.shares()
    assert shares[2].values == {'preds': [], 'targs': []} and shares[0].values == {'total': 0.0, 'count': 0}
    assert _combine_all([full, empty]) == [[], []]
    for t in (full, empty): assert [_value(m) for m in t.mets] == pytest.approx([_value(m) for m in whole], abs=1e-6)

def test_combined_perplexity_equals_whole_set():
    "fastai's `Perplexity` (an AvgLoss taking `exp` of the mean) combined from 2 ranks gives its whole-set value."
    pred, y = _metric_data()
    whole, ranks = _local_and_ranks(lambda: [Perplexity()], pred, y, 2)
    assert _combine_all(ranks) == [[], []]
    assert _value(ranks[0].mets[0]) == pytest.approx(_value(whole[0]), abs=1e-6)

@pytest.mark.parametrize('world', [2, 3, 4])
@pytest.mark.parametrize('metric', SHAPES, ids=lambda c: c.__name__)
def test_every_accumulator_shape_is_exact(metric, world):
    "Per-batch and per-item lists, tensors kept in order, dicts, arrays, ints and fixed vectors: the local value, on every rank."
    pred, y = _metric_data()
    whole, ranks = _local_and_ranks(lambda: [metric()], pred, y, world)
    assert _combine_all(ranks) == [[]] * world
    for t in ranks: assert _value(t.mets[0]) == pytest.approx(_value(whole[0]), abs=1e-5)

def test_equal_length_per_batch_lists_concatenate_not_add():
    "The issue's case: 6 batches on 2 ranks, 3 each. Per-batch entries are concatenated in batch order, not added up."
    pred, y = _metric_data()
    whole, ranks = _local_and_ranks(lambda: [PerBatchMedianLoss(), BatchesSeen()], pred, y, 2, bs=4)
    _combine_all(ranks)
    assert _value(ranks[1].mets[1]) == 6.0 and ranks[1].mets[0].vals == whole[0].vals

def test_metrics_without_accumulators_are_replayed_to_the_whole_set():
    "`ValueMetric` and a metric whose reset() assigns nothing or None are replayed: the local value on every rank, no problem; `AvgSmoothLoss` is left alone."
    pred, y = _metric_data()
    make = lambda: [AvgSmoothLoss(), ValueMetric(lambda: 1.0, 'one'), LastBatchAccuracy(), NoneStart(), IntCounter()]
    whole, ranks = _local_and_ranks(make, pred, y, 2)
    assert ranks[0].shares()[0] is None
    assert _combine_all(ranks) == [[], []]
    for t in ranks: assert [_value(m) for m in t.mets[1:]] == pytest.approx([_value(m) for m in whole[1:]], abs=1e-6)

def test_kinds_come_from_reset_not_from_values():
    "What reset() leaves decides: an empty list grows, a filled one is a fixed vector, numbers and filled tensors add."
    class Probe(Metric):
        def __init__(self): self.name_ = 'kept'   # set in __init__, not reset(): no accumulator
        def reset(self): self.a, self.b, self.c, self.d, self.e, self.f = [], [0, 0], torch.zeros(3), torch.tensor([]), {'k': 0}, 'label'
    assert accumulator_kinds(Probe()) == {'a': GROW, 'b': [ADD, ADD], 'c': ADD, 'd': GROW, 'e': {'k': ADD}}

def _segmentation(n=9, c=3, hw=5):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, c, (n, hw, hw), generator=g)
    pred = torch.randn(n, c, hw, hw, generator=g) + 2 * F.one_hot(y, c).permute(0, 3, 1, 2) * (torch.rand(n, 1, hw, hw, generator=g) > .3)
    return pred, y

@pytest.mark.parametrize('world', [2, 3])
def test_segmentation_metrics_are_exact(world):
    "Dice, JaccardCoeff (inter/union sums) and the multi-class ones (per-class dicts) combine to their whole-set values."
    pred, y = _segmentation()
    bin_y, bin_pred = (y == 1).long(), torch.stack([pred[:, 0] + pred[:, 2], pred[:, 1]], 1)
    make = lambda: [Dice(), JaccardCoeff(), DiceMulti(), JaccardCoeffMulti()]
    def feed(mets, batches):
        for m in mets: m.reset()
        tracker = MetricTracker(mets)
        for i in batches:
            tracker.batch_begins()
            for m, (pp, tt) in zip(mets, [(bin_pred, bin_y), (bin_pred, bin_y), (pred, y), (pred, y)]):
                m.accumulate(SimpleNamespace(pred=pp[i:i + 2], y=tt[i:i + 2], yb=(tt[i:i + 2],), to_detach=to_detach))
        return tracker
    starts = list(range(0, len(y), 2))
    whole = [_value(m) for m in feed(make(), starts).mets]
    ranks = [feed(make(), starts[r::world]) for r in range(world)]
    assert any(abs(_value(m) - w) > 1e-3 for m, w in zip(ranks[0].mets, whole))   # a shard alone is not the answer
    assert _combine_all(ranks) == [[]] * world
    for t in ranks: assert [_value(m) for m in t.mets] == pytest.approx(whole, abs=1e-6)

# ---------------------------------------------------------------- ProgressDisplay

NAMES = ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']

ROWS = [['0', '2.345678', '2.111111', '0.312500', '00:01'], ['1', '1.987654', '1.876543', '0.593750', '00:01']]

def _feed(d, rank=0, wrap=lambda e: e):
    "The events rank 0's ProgressEvents sends for a 2-epoch fit of 3 training and 2 validation batches."
    d(rank, wrap(FitStarted(2, NAMES)))
    for epoch, row, val_loss in zip((0, 1), ROWS, (2.111111, 1.876543)):
        d(rank, wrap(EpochStarted(epoch)))
        d(rank, wrap(BarStarted(3)))
        for i in (1, 2, 3): d(rank, wrap(BatchDone(i, 2.5 - epoch / 2 - i / 10)))
        d(rank, wrap(BarStarted(2)))
        d(rank, wrap(BatchDone(2, None)))
        d(rank, wrap(RowLogged(row, [2.4 - epoch / 2, 2.3 - epoch / 2, 2.2 - epoch / 2], val_loss)))

def test_progress_display_draws_rank0_events(capsys):
    "Rank 0's events draw the metrics header and each epoch's row (console output outside Jupyter)."
    d = ProgressDisplay(graph=True)
    _feed(d)
    d(1, RowLogged(['9', 'FROM_RANK1'], [0.1], 0.1))
    d(0, ('row', ['9', 'OTHER_KIND']))
    d(0, FitEnded())
    out = capsys.readouterr().out
    assert 'FROM_RANK1' not in out and 'OTHER_KIND' not in out
    header = next(l for l in out.splitlines() if 'train_loss' in l)
    assert header.split() == NAMES
    lines = [l.split() for l in out.replace('\r', '\n').splitlines()]
    assert [l for l in lines if l in ROWS] == ROWS   # each row once, in order
    assert d.losses == pytest.approx([2.4, 2.3, 2.2, 1.9, 1.8, 1.7]) and d.val_losses == [2.111111, 1.876543] and d.epoch_ends == [3, 6]
    assert d.mbar is None and d.pbar is None
    d.close()   # after 'end': nothing left to close, nothing drawn, no error
    assert capsys.readouterr().out == '' and d.mbar is None

@pytest.mark.parametrize('rank,wrap', [(1, lambda e: e), (0, lambda e: ('progress', e))])
def test_progress_display_ignores_other_ranks_and_kinds(capsys, rank, wrap):
    "Events from rank 1, or of another kind than a progress record, draw nothing and change nothing."
    d = ProgressDisplay(graph=True)
    _feed(d, rank, wrap)
    d(rank, wrap(FitEnded()))
    d.close()
    assert capsys.readouterr().out == ''
    assert d.mbar is None and d.losses == [] and d.n_epoch == 0

# ---------------------------------------------------------------- merged_history

def test_merged_history():
    "The checkpoint's `done` epochs go in front: its rows, losses and lrs, then the resumed fit's with iterations offset."
    old = dict(values=[[1.0, 0.9, 0.5], [0.8, 0.7, 0.6]], losses=[1.2, 1.1, 1.0, 0.9], lrs=[0.1, 0.1, 0.1, 0.1],
               iters=[2, 4], metric_names=['old'])
    hist = dict(values=[[], [], [0.6, 0.5, 0.7], [0.5, 0.4, 0.8]], losses=[0.8, 0.7, 0.6, 0.5], lrs=[0.05, 0.05, 0.01, 0.01],
                iters=[0, 0, 2, 4], metric_names=['epoch', 'train_loss', 'valid_loss', 'accuracy'], hps={'lr': [0.1]})
    before = {k: list(v) if isinstance(v, list) else v for k, v in hist.items()}
    out = merged_history(hist, old, 2)
    assert out['values'] == [[1.0, 0.9, 0.5], [0.8, 0.7, 0.6], [0.6, 0.5, 0.7], [0.5, 0.4, 0.8]]
    assert out['losses'] == [1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert out['lrs'] == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.01, 0.01]
    assert out['iters'] == [2, 4, 6, 8]
    assert out['metric_names'] == hist['metric_names'] and out['hps'] == {'lr': [0.1]}
    assert hist == before   # the input is not modified

def test_merged_history_one_epoch_done():
    "After one checkpointed epoch of three: one old row, two new ones, iterations counted on from the old epoch's."
    old = dict(values=[[0.9]], losses=[1.0, 0.9, 0.8], lrs=[1e-3] * 3, iters=[3])
    hist = dict(values=[[], [0.7], [0.6]], losses=[0.7, 0.6, 0.5, 0.4, 0.3, 0.2], lrs=[2e-3] * 6, iters=[0, 3, 6])
    out = merged_history(hist, old, 1)
    assert out['values'] == [[0.9], [0.7], [0.6]] and out['iters'] == [3, 6, 9]
    assert out['losses'] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2] and out['lrs'] == [1e-3] * 3 + [2e-3] * 6

# ---------------------------------------------------------------- learner_result / apply_result

def _adam_learner(seed: int, model=None) -> Learner:
    "A small digits Learner with Adam, whose optimizer state (averages, step counts) is worth moving."
    return Learner(digits_dls_plain(96, 32, bs=16, shuffle=True), model or mlp(seed), loss_func=CrossEntropyLossFlat(),
                   opt_func=Adam, metrics=accuracy)

def _trained(learn: Learner, n_epoch: int = 1) -> Learner:
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, 1e-2)
    return learn

def test_learner_result_apply_result_round_trip():
    "A trained Learner's result, applied to a fresh one, gives it the same weights, history, optimizer state and counters."
    learn = _trained(_adam_learner(0))
    res = learner_result(learn)
    assert all(v.device.type == 'cpu' for v in res['state_dict'].values())
    assert all(v.device.type == 'cpu' for s in res['opt']['state'] for v in s.values() if isinstance(v, torch.Tensor))
    assert len(res['recorder']['losses']) == 6 and all(type(l) is float for l in res['recorder']['losses'])
    fresh = _adam_learner(1)
    assert max(float((a - b).abs().max()) for a, b in zip(params_of(fresh.model).values(), params_of(learn.model).values())) > 1e-3
    apply_result(fresh, res)
    assert params_of(fresh.model).keys() == params_of(learn.model).keys()
    assert all(torch.equal(a, b) for a, b in zip(params_of(fresh.model).values(), params_of(learn.model).values()))
    r0, r1 = learn.recorder, fresh.recorder
    assert r1.values == r0.values and len(r1.values) == 1 and len(r1.values[0]) == 3
    assert [float(l) for l in r1.losses] == [float(l) for l in r0.losses] and len(r0.losses) == 6
    assert r1.lrs == r0.lrs and r1.iters == r0.iters == [6] and list(r1.metric_names) == list(r0.metric_names)
    s0, s1 = learn.opt.state_dict(), fresh.opt.state_dict()
    assert len(s1['state']) == len(s0['state']) == 4 and s1['hypers'] == s0['hypers']
    for a, b in zip(s0['state'], s1['state']):
        assert a.keys() == b.keys() and {'grad_avg', 'sqr_avg', 'step'} <= set(a)
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    assert (fresh.epoch, fresh.n_epoch) == (learn.epoch, learn.n_epoch) == (0, 1)
    assert list(fresh.final_record) == list(learn.final_record) and len(fresh.final_record) == 3
    before = params_of(fresh.model)
    _trained(fresh)   # the applied optimizer state steps
    assert not all(torch.equal(a, b) for a, b in zip(before.values(), params_of(fresh.model).values()))

def test_apply_result_to_other_model_raises():
    "Applying a result to a Learner whose model differs raises LaunchError naming the mismatched keys."
    res = learner_result(_adam_learner(0))
    other = _adam_learner(0, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    before = params_of(other.model)
    with pytest.raises(LaunchError, match=r"mismatched keys: \['1\.weight', '1\.bias', '3\.weight', '3\.bias'\]"): apply_result(other, res)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), params_of(other.model).values()))

# ---------------------------------------------------------------- EpochCheckpoint

def _small_sgd() -> Learner: return sgd_learner(digits_dls_plain(64, 32, bs=16, shuffle=True), mlp(0))

def test_epoch_checkpoint_rank0_writes(tmp_path, monkeypatch):
    "On rank 0 a fit leaves a private checkpoint of its last epoch: completed_epoch, weights, history, tags."
    monkeypatch.delenv('RANK', raising=False); monkeypatch.delenv('WORLD_SIZE', raising=False)
    p = tmp_path / 'ck.pth'
    learn = _small_sgd()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 0.1, cbs=EpochCheckpoint(p, job_digest='x'))
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [f.name for f in tmp_path.iterdir()] == ['ck.pth']   # no temp file left beside it
    ck = torch.load(p, weights_only=False)
    assert ck['completed_epoch'] == 1 and ck['job_digest'] == 'x' and ck['epoch'] == 1 and ck['n_epoch'] == 2
    sd = params_of(learn.model)
    assert ck['state_dict'].keys() == sd.keys() and all(torch.equal(ck['state_dict'][k], sd[k]) for k in sd)
    assert len(ck['recorder']['values']) == 2 and ck['recorder']['iters'] == learn.recorder.iters

def test_epoch_checkpoint_without_tags(tmp_path, monkeypatch):
    "Without tags the checkpoint holds only the result, `completed_epoch` and, once the fit is over, `finished`."
    monkeypatch.delenv('RANK', raising=False)
    p = tmp_path / 'ck.pth'
    learn = _small_sgd()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1, cbs=EpochCheckpoint(p))
    ck = torch.load(p, weights_only=False)
    assert ck['completed_epoch'] == 0 and 'job_digest' not in ck and ck['finished'] is True
    assert set(ck) == {'state_dict', 'recorder', 'opt', 'epoch', 'n_epoch', 'final_record', 'completed_epoch', 'finished'}

@pytest.mark.parametrize('rank,written', [('1', False), ('0', True)])
def test_epoch_checkpoint_only_on_rank0(tmp_path, monkeypatch, rank, written):
    """At an epoch end with RANK/WORLD_SIZE faked, only rank 0 of 2 writes. (A whole fit cannot run with WORLD_SIZE=2
    and no group: fastai's AvgSmoothLoss gathers its loss; so the fit runs as one process and the epoch end is replayed.)"""
    p = tmp_path / 'ck.pth'
    learn = _trained(_small_sgd(), 2)
    cb = EpochCheckpoint(p)
    learn.add_cb(cb)
    monkeypatch.setenv('RANK', rank); monkeypatch.setenv('WORLD_SIZE', '2')
    cb.after_epoch()
    assert p.exists() == written
    if written: assert torch.load(p, weights_only=False)['completed_epoch'] == 1

class _CheckpointSeen(Callback):
    "Right after EpochCheckpoint (order 70), each epoch end: (completed_epoch, rows) of the checkpoint file, or None."
    order = 71
    def __init__(self, path): self.path,self.seen = path,[]
    def after_epoch(self):
        ck = torch.load(self.path, weights_only=False) if self.path.exists() else None
        self.seen.append(ck and (ck['completed_epoch'], len(ck['recorder']['values'])))
        assert not (ck or {}).get('finished'), "an epoch's checkpoint marked as the fit's result"

@pytest.mark.parametrize('how', ['start_epoch', 'restart'])
def test_first_epoch_after_a_resume_is_checkpointed(tmp_path, monkeypatch, how):
    "A 4-epoch fit resumed after epochs 0-1 (the user's start_epoch=2, or a restart from their checkpoint) checkpoints epoch 2 at its end, with all 3 rows, then epoch 3."
    monkeypatch.delenv('RANK', raising=False)
    p = tmp_path / 'ck.pth'
    learn = _small_sgd()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 0.1, cbs=EpochCheckpoint(p))
    ck = torch.load(p, weights_only=False)
    p.unlink()
    if how == 'restart': learn = _small_sgd()   # a relaunched worker's fresh Learner: resume_callbacks applies the checkpoint
    kwargs, cbs = (resume_callbacks(learn, 'fit_one_cycle', {'start_epoch': 2}, p, history=ck['recorder']) if how == 'start_epoch'
                   else resume_callbacks(learn, 'fit_one_cycle', {}, p, resumed=ck))
    seen = _CheckpointSeen(p)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 0.1, cbs=cbs + [seen], **kwargs)
    assert kwargs['start_epoch'] == 2 and seen.seen == [None, None, (2, 3), (3, 4)]

# ---------------------------------------------------------------- worker_learner

def _logged_learner(tmp_path) -> Learner:
    return sgd_learner(digits_dls_plain(32, 16, bs=16), mlp(0), cbs=CSVLogger(fname=str(tmp_path / 'h.csv')))

def _has(cbs, cls) -> bool: return any(isinstance(c, cls) or c is cls for c in cbs)

def test_worker_learner_rank1_drops_rank0_only_callbacks(tmp_path, monkeypatch):
    "On rank 1 the CSVLogger and progress bar leave the Learner and the schedule's cbs, and nothing is printed."
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')
    learn = _logged_learner(tmp_path)
    assert _has(learn.cbs, CSVLogger) and _has(learn.cbs, ProgressCallback)
    keep = AvgSmoothLoss   # not a callback: kept untouched as a stand-in for the user's own entries
    kwargs = {'cbs': [CSVLogger, CSVLogger(fname='x.csv'), keep], 'lr': 0.1}
    out, kw = worker_learner(learn, kwargs)
    assert out is learn and out.logger is noop
    assert not _has(out.cbs, CSVLogger) and not _has(out.cbs, ProgressCallback)
    assert kw == {'cbs': [keep], 'lr': 0.1} and len(kwargs['cbs']) == 3   # the caller's kwargs are not modified

def test_worker_learner_rank0_keeps_unless_dropped(tmp_path, monkeypatch):
    "On rank 0 the callbacks stay (and the logger prints) unless listed in rank0_drops; `quiet` silences the logger."
    monkeypatch.setenv('RANK', '0'); monkeypatch.setenv('WORLD_SIZE', '2')
    learn, kw = worker_learner(_logged_learner(tmp_path), {'cbs': CSVLogger})
    assert _has(learn.cbs, CSVLogger) and _has(learn.cbs, ProgressCallback) and learn.logger is print
    assert kw['cbs'] == [CSVLogger]
    learn, kw = worker_learner(_logged_learner(tmp_path), {'cbs': [CSVLogger()]}, rank0_drops=('fastai.callback.progress.CSVLogger',))
    assert not _has(learn.cbs, CSVLogger) and _has(learn.cbs, ProgressCallback) and kw['cbs'] == [] and learn.logger is print
    learn, kw = worker_learner(lambda: _logged_learner(tmp_path), {}, quiet=True)
    assert isinstance(learn, Learner) and learn.logger is noop and _has(learn.cbs, CSVLogger) and kw == {}

def test_worker_learner_factory_must_return_learner(monkeypatch):
    "A factory that returns something other than a Learner raises TypeError naming what it returned."
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(TypeError, match='returned dict, not a Learner'): worker_learner(lambda: {'model': 1}, {})

# ---------------------------------------------------------------- import order (fresh interpreters)

def _python(code: str) -> str:
    r = subprocess.run([sys.executable, '-c', code], env=helpers.subprocess_env(MPIFY_PREWARM=0), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]

_CHECK_METHODS = """
from fastai.learner import Learner
from mpify_fastai.import_hooks import _ImportHook
names = ('fit_ddp', 'ddp', 'save_ddp_job', 'load_ddp_result')
mods = [getattr(getattr(Learner, n, None), '__module__', None) for n in names]
print(mods, any(isinstance(f, _ImportHook) and f.packages[0] == 'fastai' for f in sys.meta_path))
"""
_METHODS_ADDED = "['mpify_fastai.learner', 'mpify_fastai.learner', 'mpify_fastai.job', 'mpify_fastai.job'] False"

def test_import_alone_imports_neither_fastai_nor_torch():
    "`import mpify_fastai` loads no fastai or torch module, and leaves its hook waiting on `sys.meta_path`."
    out = _python("import sys, mpify_fastai\nfrom mpify_fastai.import_hooks import _ImportHook\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastai', 'torch')), "
                  "sum(isinstance(f, _ImportHook) and f.packages[0] == 'fastai' for f in sys.meta_path))")
    assert out == '[] 1'

def test_import_mpify_then_fastai_adds_methods():
    "mpify_fastai first, then `from fastai.vision.all import *`: the Learner methods appear and the hook is gone."
    assert _python("import sys, mpify_fastai\nfrom fastai.vision.all import *\n" + _CHECK_METHODS) == _METHODS_ADDED

def test_import_fastai_then_mpify_adds_methods():
    "fastai first, then mpify_fastai: the Learner methods appear at once and no hook is installed."
    assert _python("import sys\nfrom fastai.vision.all import *\nimport mpify_fastai\n" + _CHECK_METHODS) == _METHODS_ADDED

_TORCH_LATER = """
import time, mpify_fastai
from mpify_fastai import ranch
from mpify_fastai.warm import warm_ready
assert not warm_ready()
import torch
t = time.monotonic()
while not warm_ready() and time.monotonic() - t < 90: time.sleep(0.05)
ready = time.monotonic() - t
t = time.monotonic()
out = ranch(2, torch.add, torch.ones(2), 1)
print(ready, time.monotonic() - t, [o.tolist() for o in out])
"""

def test_warm_server_starts_when_torch_comes_after_mpify():
    "`import mpify_fastai`, then `import torch`: the warm server starts in the background, and the first tensor call is fast."
    r = subprocess.run([sys.executable, '-c', _TORCH_LATER], env=helpers.subprocess_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    ready, first, out = r.stdout.split(maxsplit=2)
    assert float(ready) < 60 and float(first) < 1.5 and out.strip() == '[[2.0, 2.0], [2.0, 2.0]]', r.stdout

@pytest.mark.parametrize('name', ['DDPJob', 'apply_result', 'DistributedRunner'])
def test_fastai_layer_name_first_adds_methods(name):
    "A fastai-layer name read from mpify_fastai before fastai is imported loads it in order: the Learner methods appear."
    r = subprocess.run([sys.executable, '-c', f"import sys, mpify_fastai\nmpify_fastai.{name}\n" + _CHECK_METHODS],
                       env=helpers.subprocess_env(MPIFY_PREWARM=0), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'could not add' not in r.stderr, r.stderr
    assert r.stdout.strip().splitlines()[-1] == _METHODS_ADDED

# ---------------------------------------------------------------- shards of any DataLoader kind; the DDP wrapper

def _sorted_dl(n=40):
    from fastai.text.data import SortedDL
    items = [list(range(1 + (i * 7) % 13)) for i in range(n)]
    return SortedDL(items, res=[(len(x),) for x in items], bs=4, shuffle=True, before_batch=lambda b: b,
                    create_batch=lambda b: b)

@pytest.mark.parametrize('world', [2, 3])
def test_sorted_dl_shards_partition_the_epoch_and_keep_rank_randomness(world):
    "SortedDL shuffles with numpy's global RNG: with ranks in different RNG states, their shards still partition one epoch, and each rank's global RNG state is its own afterwards."
    import numpy as np, random
    shares = []
    for rank in range(world):
        np.random.seed(100 + rank); random.seed(rank); torch.manual_seed(rank)   # as augmentation/dropout leave them
        np.random.rand(rank * 7)                                                # ... having drawn different amounts
        dl = _sorted_dl()
        shard_dl(dl, rank, world, pad=False, seed=7)
        before = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()
        shares.append(list(dl.get_idxs()))
        after = np.random.get_state()[1], random.getstate(), torch.get_rng_state()
        assert (after[0] == before[0]).all() and after[1] == before[1] and torch.equal(after[2], before[2])
    assert sorted(i for s in shares for i in s) == list(range(40))
    assert shares[0] != sorted(shares[0])                                       # shuffled, not in plain order

def test_module_ddp_answers_for_its_module(tmp_path):
    "Under DDP, `learn.model.reset()` and the module's attributes work, as fastai's callbacks (ModelResetter) expect."
    import torch.distributed as dist
    from mpify_fastai.runner import ModuleDDP
    class WithReset(nn.Module):
        def __init__(self): super().__init__(); self.encoder = nn.Linear(3, 3); self.resets = 0
        def reset(self): self.resets += 1
        def forward(self, x): return self.encoder(x)
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        m = ModuleDDP(WithReset())
        m.reset(); m.reset()
        assert m.module.resets == 2 and m.encoder is m.module.encoder and m(torch.ones(1, 3)).shape == (1, 3)
        with pytest.raises(AttributeError, match='no_such_thing'): m.no_such_thing
    finally: dist.destroy_process_group()

class MyLogger(Callback):
    "A user's callback that talks to the outside world: marked to run on rank 0 only."
    rank0_only = True

def test_rank0_only_marker_and_fastai_loggers(monkeypatch):
    "`rank0_only = True` on a user's callback, fastai's loggers (and their subclasses) run on rank 0 only; others run everywhere."
    class MyCSV(CSVLogger): pass
    assert is_rank0_only(MyLogger()) and is_rank0_only(MyLogger) and is_rank0_only(MyCSV) and is_rank0_only(ProgressCallback())
    assert not is_rank0_only(EpochCheckpoint('x')) and not is_rank0_only(AvgSmoothLoss)
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')
    learn = sgd_learner(digits_dls_plain(64, 32, bs=16), mlp(), cbs=[MyLogger()])
    learn, kw = worker_learner(learn, {'cbs': [MyLogger(), MyCSV()]})
    assert not any(isinstance(cb, MyLogger) for cb in learn.cbs) and kw['cbs'] == []
    monkeypatch.setenv('RANK', '0')
    learn, kw = worker_learner(sgd_learner(digits_dls_plain(64, 32, bs=16), mlp(), cbs=[MyLogger()]), {'cbs': [MyLogger()]})
    assert any(isinstance(cb, MyLogger) for cb in learn.cbs) and len(kw['cbs']) == 1


# ---------------------------------------------------------------- DataLoader workers per rank

@pytest.mark.parametrize('ranks_here, default_gets', [(1, 8), (2, 4), (3, 2), (16, 0)])
def test_ranks_share_the_default_loader_workers(monkeypatch, ranks_here, default_gets):
    "fastai's default (one worker per core, up to 16) is the host's: each rank takes its share; a chosen number stays."
    from fastai.data.core import TfmdDL
    from fastai.torch_core import defaults
    monkeypatch.setattr(defaults, 'cpus', 8)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(ranks_here))
    items = list(range(10))
    default, chosen, none = TfmdDL(items, bs=2), TfmdDL(items, bs=2, num_workers=3), TfmdDL(items, bs=2, num_workers=0)
    assert default.fake_l.num_workers == 8
    assert [share_loader_workers(dl) for dl in (default, chosen, none)] == [default_gets, 3, 0]
    flat = lambda dl: [int(v) for b in dl for v in (b[0] if isinstance(b, tuple) else b)]
    assert flat(default) == items   # still every batch, in order
