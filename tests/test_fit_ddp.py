"""End-to-end tests of `Learner.fit_ddp` / `Learner.ddp(...)` / `fit_ddp(factory, ...)`: real worker processes, real
fastai Learners, a real gloo group on the CPU, nothing mocked.

A launch from the default warm fork server takes a few seconds; one with `start_method='spawn'` starts interpreters
that import fastai (15-40 s on the 2-core machine). Each test makes few launches and checks many things about each.
Callbacks and factories the workers need live in `fastai_helpers`. The longer end-to-end cases are marked `slow`
(run them with `pytest -m slow`, everything with `pytest -m ""`).
"""
from __future__ import annotations
import copy, json, os, re, time
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import numpy as np
import pytest
import torch

from fastai.callback.progress import CSVLogger
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import RocAuc, accuracy, F1Score
from fastai.data.core import DataLoaders
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune)

import mpify_fastai
from mpify_fastai import WorkerError
from mpify_fastai.demo import digits_cnn, digits_dls

import fastai_helpers as fh
import helpers

def _rank_files(folder: Path, nprocs: int) -> list[list[int]]:
    "What `RecordWorld` wrote on each rank: [rank, world, training batches, epochs] per rank."
    return [[int(x) for x in Path(folder, f'rank{r}.txt').read_text().split()] for r in range(nprocs)]

def _cnn_learner(dls, seed: int = 0, **kw) -> Learner:
    torch.manual_seed(seed)
    return Learner(dls, digits_cnn(), loss_func=CrossEntropyLossFlat(), **kw)

# ---------------------------------------------------------------- default set

def test_one_ddp_step_averages_gradients_over_ranks(tmp_path):
    """One DDP step of 2 ranks x B samples == one single-process step over the same 2B samples: DDP averages the two
    ranks' gradients into one model (not two models trained apart, not one rank's half of the data)."""
    B, lr = 64, 0.5
    train, valid = fh.digits_dsets(2 * B, 100)
    learn = fh.sgd_learner(DataLoaders.from_dsets(train, valid, bs=B, shuffle=False), fh.mlp(0))
    init = fh.params_of(learn.model)

    # spawn (fresh interpreters), not the default warm fork server: the workers import fastai and fastai_helpers themselves
    learn.fit_ddp(1, lr, nprocs=2, cbs=fh.RecordWorld(tmp_path), start_method='spawn')
    got = fh.params_of(learn.model)
    assert _rank_files(tmp_path, 2) == [[0, 2, 1, 1], [1, 2, 1, 1]], "each rank must run exactly one step of one epoch"

    def local_step(train_items, bs):
        ref = fh.sgd_learner(DataLoaders.from_dsets(train_items, valid, bs=bs, shuffle=False), fh.mlp(0))
        ref.model.load_state_dict(init)
        with ref.no_bar(), ref.no_logging(): ref.fit(1, lr)
        return fh.params_of(ref.model)

    full = local_step(train, 2 * B)     # one step over all 2B samples
    rank0_only = local_step(train[0::2], B)   # what rank 0 alone would do with its shard (the even samples)
    assert fh.max_abs_diff(init, full) > 1e-2, "the reference step must move the weights measurably"
    assert fh.max_abs_diff(got, full) < 1e-5, "DDP step differs from the full-batch step"
    assert fh.max_abs_diff(got, rank0_only) > 1e-3, "the result looks like rank 0's shard alone: gradients not averaged"
    assert len(learn.recorder.values) == 1

def test_one_process_matches_local_fit():
    "fit_ddp(nprocs=1) trains exactly like learn.fit: same weights, same history, same optimizer state."
    model = (torch.manual_seed(0), digits_cnn())[1]
    dls = lambda: fh.digits_dls_plain(384, 120, bs=64, shuffle=False)
    a = Learner(dls(), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    b = Learner(dls(), copy.deepcopy(model), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    assert fh.bitwise_equal(fh.params_of(a.model), fh.params_of(b.model))

    a.fit_ddp(2, 1e-2, nprocs=1)
    with b.no_bar(), b.no_logging(): b.fit(2, 1e-2)
    assert fh.max_abs_diff(fh.params_of(a.model), fh.params_of(b.model)) < 1e-6
    va, vb = np.array(a.recorder.values, dtype=float), np.array(b.recorder.values, dtype=float)
    assert va.shape == vb.shape == (2, 3)
    np.testing.assert_allclose(va, vb, atol=1e-5)
    sa = [a.opt.state[p] for p in a.opt.all_params(with_grad=False).itemgot(0)]
    sb = [b.opt.state[p] for p in b.opt.all_params(with_grad=False).itemgot(0)]
    assert [s.get('step') for s in sa] == [s.get('step') for s in sb] == [2 * 6] * len(sa)
    for x, y in zip(sa, sb):
        assert max(float((x[k] - y[k]).abs().max()) for k in ('grad_avg', 'sqr_avg')) < 1e-6

def test_metrics_exact_on_uneven_validation_set(tmp_path, no_leftovers):
    """3 ranks, 361 validation items (not a multiple of 3): the last recorded row equals the parent's learn.validate()
    for valid_loss (AvgLoss), accuracy (AvgMetric) and two AccumMetrics; history, plot and optimizer come home."""
    dls = digits_dls(bs=64, n_valid=361)
    assert len(dls.valid_ds) == 361 and len(dls.train_ds) == 1436
    learn = _cnn_learner(dls, metrics=[accuracy, RocAuc(), F1Score(average='macro')])
    learn.fit_ddp(2, 1e-2, nprocs=3, cbs=fh.RecordWorld(tmp_path))

    rec = learn.recorder
    assert list(rec.metric_names) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'roc_auc_score', 'f1_score', 'time']
    assert len(rec.values) == 2 and all(len(r) == 5 for r in rec.values)
    per_rank = -(-1436 // 3) // 64     # 479 padded items per rank, whole batches of 64 only (shuffled train drops the last)
    assert _rank_files(tmp_path, 3) == [[r, 3, 2 * per_rank, 2] for r in range(3)]
    assert len(rec.losses) == len(rec.lrs) == 2 * per_rank and rec.iters == [per_rank, 2 * per_rank]   # rank 0's steps
    rec.plot_loss()
    import matplotlib.pyplot as plt
    plt.close('all')

    last = [float(v) for v in rec.values[-1]]
    val = [float(v) for v in learn.validate()]
    assert len(val) == 4
    assert np.allclose(last[1:], val, atol=1e-4, rtol=0), f"recorded {last[1:]} != validate() {val}"
    assert 0 < val[1] < 1 and 0.5 < val[2] <= 1

    assert learn.opt is not None
    params = learn.opt.all_params(with_grad=False).itemgot(0)
    assert {learn.opt.state[p].get('step') for p in params} == {2 * per_rank}, "rank 0's optimizer state did not come home"
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)   # a local fit continues from it
    assert {learn.opt.state[p].get('step') for p in params} == {2 * per_rank + 1436 // 64}

def test_failure_on_rank1_leaves_learner_untouched(tmp_path, no_leftovers):
    """A callback raising on rank 1 in epoch 1: WorkerError naming rank 1 with the remote traceback, promptly; the
    notebook Learner unchanged; the error's checkpoint holds the epoch-0 weights; the next fit_ddp works."""
    learn = _cnn_learner(fh.digits_dls_plain(512, 128, bs=64, shuffle=True), metrics=accuracy)
    before = fh.params_of(learn.model)
    with pytest.raises(WorkerError) as ei:
        learn.fit_ddp(3, 1e-2, nprocs=2, cbs=fh.FailOnRank(tmp_path, rank=1, epoch=1))
    caught = time.time()
    e = ei.value
    failed_at = float((tmp_path / 'failed_at').read_text())
    assert caught - failed_at < 30, f"the error took {caught - failed_at:.1f} s to arrive"
    assert isinstance(e, mpify_fastai.LaunchError) and e.rank == 1 and e.exc_type == 'RuntimeError'
    msg = str(e)
    assert msg.startswith('rank 1 raised RuntimeError'), msg
    assert 'planned failure on rank 1 in epoch 1, batch 0' in msg and '--- traceback from rank 1 ---' in msg
    assert 'planned failure on rank 1' in e.remote_traceback and 'after_batch' in e.remote_traceback
    assert 'fastai_helpers.py' in e.remote_traceback

    assert fh.bitwise_equal(fh.params_of(learn.model), before), "a failed fit_ddp changed the notebook's weights"
    assert learn.opt is None and not getattr(learn.recorder, 'values', None), "history or optimizer changed"

    ck = getattr(e, 'checkpoint', None)
    assert ck and os.path.exists(ck), f"no checkpoint on the error: {msg}"
    try:
        assert ck in msg
        saved = torch.load(ck, weights_only=False)
        assert saved['epoch'] == 0
        expected = torch.load(tmp_path / 'epoch0.pth')
        assert fh.bitwise_equal(saved['state_dict'], expected), "checkpoint is not the last completed epoch's weights"
        assert not fh.bitwise_equal(saved['state_dict'], before)
        assert not (tmp_path / 'epoch1.pth').exists()
    finally: os.remove(ck)

    learn.fit_ddp(1, 1e-2, nprocs=2)
    assert len(learn.recorder.values) == 1
    assert not fh.bitwise_equal(fh.params_of(learn.model), before)

# ---------------------------------------------------------------- slow set

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tracker_and_logger_callbacks(tmp_path):
    """SaveModelCallback + EarlyStoppingCallback + CSVLogger under DDP: every rank stops after the same epoch, one CSV
    (one header, one row per epoch run), one model file, and the notebook ends with the saved best weights.

    EarlyStopping with a huge min_delta stops deterministically after patience+1 = 2 epochs. SaveModelCallback
    tracks the *highest* valid_loss (comp=np.greater) so that its "best" is epoch 0, not the last epoch: loading the
    best weights at the end is then visible in the notebook's weights and in its validate()."""
    learn = _cnn_learner(fh.digits_dls_plain(768, 200, bs=64, shuffle=True), metrics=accuracy, path=tmp_path,
                         cbs=CSVLogger())                                 # a logger on the Learner itself, as usual
    cbs = [SaveModelCallback(monitor='valid_loss', comp=np.greater, fname='best'),
           EarlyStoppingCallback(monitor='valid_loss', min_delta=10., patience=1), fh.RecordWorld(tmp_path)]
    learn.fit_ddp(6, 1e-2, nprocs=2, cbs=cbs)

    ran = _rank_files(tmp_path, 2)
    assert [r[3] for r in ran] == [2, 2], f"ranks ran different numbers of epochs (or not 2): {ran}"
    assert ran[0][2] == ran[1][2] == 2 * (384 // 64)
    rows = learn.recorder.values
    assert len(rows) == 2

    lines = (tmp_path / 'history.csv').read_text().splitlines()
    assert lines[0] == 'epoch,train_loss,valid_loss,accuracy,time', lines
    assert len(lines) == 3 and [l.split(',')[0] for l in lines[1:]] == ['0', '1'], lines
    for line, row in zip(lines[1:], rows):
        assert np.allclose([float(x) for x in line.split(',')[1:4]], row, atol=1e-6), (line, row)
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['best.pth']

    best = torch.load(tmp_path / 'models' / 'best.pth')
    assert fh.bitwise_equal(fh.params_of(learn.model), {k: v.cpu() for k, v in best.items()})
    best_epoch = int(np.argmax([r[1] for r in rows]))
    assert best_epoch == 0, f"valid_loss did not fall in epoch 1 ({rows}): the test premise fails"
    rows = [[float(v) for v in r] for r in rows]    # validate() replaces the recorder's history: copy it first
    val = [float(v) for v in learn.validate()]
    assert np.allclose(val, rows[best_epoch][1:], atol=1e-4), (val, rows)
    assert not np.allclose(val, rows[-1][1:], atol=1e-4)

_SCRIPT = '''
import json
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
import mpify_fastai  # adds Learner.fit_ddp (in either import order)
from mpify_fastai.demo import digits_cnn, digits_dls

def main():
    learn = Learner(digits_dls(bs=64), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.fit_ddp(2, 1e-2, nprocs=2)
    print("HISTORY " + json.dumps([[float(v) for v in row] for row in learn.recorder.values]))

if __name__ == "__main__":
    main()
'''

_ROW = re.compile(r'^(\d+)\s+(\d+\.\d{6})\s+(\d+\.\d{6})\s+(\d+\.\d{6})\s+\d\d:\d\d\s*$')

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_batch_script_with_main_guard(tmp_path):
    "A script under the main guard trains end to end; its stdout holds one metrics table with one row per epoch."
    script = tmp_path / 'train.py'
    script.write_text(_SCRIPT)
    res = helpers.run_script(script, timeout=200)
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    pieces = [p.strip() for p in re.split(r'[\r\n]', res.stdout)]
    headers = [p for p in pieces if p.split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']]
    assert len(headers) == 1, res.stdout
    rows = [m.groups() for m in map(_ROW.match, pieces) if m]
    assert [r[0] for r in rows] == ['0', '1'], res.stdout
    hist = json.loads(next(p for p in pieces if p.startswith('HISTORY '))[len('HISTORY '):])
    assert [[float(x) for x in r[1:]] for r in rows] == [[round(v, 6) for v in h] for h in hist]
    assert 'Traceback' not in res.stderr, res.stderr

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_one_cycle_schedule(tmp_path):
    "learn.ddp(nprocs=2).fit_one_cycle(2): the one-cycle schedule runs in the workers and its history comes home."
    learn = _cnn_learner(fh.digits_dls_plain(768, 200, bs=64, shuffle=True), metrics=accuracy)
    learn.ddp(nprocs=2).fit_one_cycle(2, 1e-2)
    rec = learn.recorder
    steps = 2 * (384 // 64)
    assert len(rec.values) == 2 and len(rec.lrs) == steps
    lrs = np.array(rec.lrs)
    assert lrs[0] == pytest.approx(1e-2 / 25, rel=1e-3) and lrs.max() == pytest.approx(1e-2, rel=0.05)
    assert 0 < lrs.argmax() < steps // 2 and lrs[-1] < lrs.max() / 20, f"not a one-cycle schedule: {lrs}"
    last = [float(v) for v in rec.values[-1]]      # validate() replaces the recorder's history: read it first
    assert np.allclose([float(v) for v in learn.validate()], last[1:], atol=1e-4)

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_fine_tune_freezes_then_unfreezes(tmp_path):
    """learn.ddp(nprocs=2).fine_tune(1): a frozen fit of the head, then an unfrozen fit of everything, both in DDP
    (a model with two parameter groups from a splitter)."""
    learn = Learner(fh.digits_dls_plain(768, 200, bs=64, shuffle=True), fh.two_part_model(0), loss_func=CrossEntropyLossFlat(),
                    metrics=accuracy, splitter=fh.body_head_splitter)
    before = fh.params_of(learn.model)
    learn.ddp(nprocs=2).fine_tune(1, 1e-2, cbs=fh.RecordFits(tmp_path))
    fits = [[int(x) for x in l.split()] for l in (tmp_path / 'fits.txt').read_text().splitlines()]
    head, total = 32 * 10 + 10, 64 * 32 + 32 + 32 * 10 + 10
    assert fits == [[1, head, total], [1, total, total]], fits
    assert len(learn.recorder.values) == 1    # the history of the last fit, as after a local fine_tune
    after = fh.params_of(learn.model)
    assert all(not torch.equal(before[k], after[k]) for k in before), "some parameter group was not trained"
    assert len(learn.opt.param_groups) == 2 and all(p.requires_grad for p in learn.model.parameters())
    last = [float(v) for v in learn.recorder.values[-1]]
    assert np.allclose([float(v) for v in learn.validate()], last[1:], atol=1e-4)

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_function_form_returns_trained_learner():
    "fit_ddp(factory, 2, nprocs=2) builds the Learner in each worker and returns one built here, trained."
    fresh = fh.params_of(fh.factory_learner().model)
    learn = mpify_fastai.fit_ddp(fh.factory_learner, 2, 1e-2, nprocs=2)
    assert isinstance(learn, Learner)
    assert len(learn.recorder.values) == 2 and list(learn.recorder.metric_names)[:4] == ['epoch', 'train_loss', 'valid_loss', 'accuracy']
    assert not fh.bitwise_equal(fh.params_of(learn.model), fresh)
    last = [float(v) for v in learn.recorder.values[-1]]
    assert np.allclose([float(v) for v in learn.validate()], last[1:], atol=1e-4)
    assert last[2] > 0.5, "two epochs on digits should beat chance by far"

def test_training_shards_are_padded_so_every_rank_steps_together(tmp_path, no_leftovers):
    "97 training items, bs 16, 3 ranks: unpadded shares of 33, 32, 32 would step 3, 2, 2 times (rank 0 would wait alone in its third all-reduce); padded, every rank steps 3 times."
    train, valid = fh.digits_dsets(97, 40)
    dls = DataLoaders.from_dsets(train, valid, bs=16, shuffle=True, drop_last=False)
    learn = fh.sgd_learner(dls, fh.mlp(), metrics=accuracy)
    learn.fit_ddp(1, 0.1, nprocs=3, cbs=fh.RecordWorld(str(tmp_path)), progress=False, timeout=60)
    assert [(tmp_path / f'rank{r}.txt').read_text().split()[2] for r in range(3)] == ['3', '3', '3']
