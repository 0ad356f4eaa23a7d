"""`split_batches=True`: each local batch split across the ranks, so a DDP fit is the local fit. Real worker processes,
a real gloo group, real fastai Learners on scikit-learn's digits (deterministic: no dropout, no BatchNorm, no
augmentation, unshuffled), compared with the same Learner trained locally in the test process.
"""
from __future__ import annotations
import inspect, json
from functools import partial

import pytest
import torch
from fastai.callback.training import GradientAccumulation
from fastai.data.load import DataLoader
from fastai.learner import Learner

import mpify_fastai
from mpify_fastai import in_torchddp
from mpify_fastai.job import load_ddp_job
from mpify_fastai.sharding import split_dl, unshard_dl

import fastai_helpers as fh
import split_helpers as sh
from test_slurm import executor, slurm  # noqa: F401  (fixtures: the private SLURM cluster, a 2-node executor)

TOL = 1e-5

def _numbers(row) -> list[float]: return [float(x) for x in row if isinstance(x, (int, float))]

def assert_same_fit(got: dict, want: dict, what: str) -> None:
    "Two `learner_result`s agree: weights, every recorder row, every step's loss and lr, the optimizer state."
    assert fh.max_abs_diff(got['state_dict'], want['state_dict']) < TOL, f"{what}: weights"
    g, w = got['recorder'], want['recorder']
    assert len(g['values']) == len(w['values']) and len(g['losses']) == len(w['losses']), f"{what}: rows or steps"
    for a, b in zip(g['values'], w['values']):
        assert len(_numbers(a)) == len(_numbers(b)) and all(abs(x - y) < TOL for x, y in zip(_numbers(a), _numbers(b))), \
            f"{what}: row {a} != local {b}"
    assert max(abs(a - b) for a, b in zip(g['losses'], w['losses'])) < TOL, f"{what}: per-step (smoothed) losses"
    assert g['lrs'] == pytest.approx(w['lrs'], rel=1e-9), f"{what}: learning rates"
    assert len(got['opt']['state']) == len(want['opt']['state'])
    for a, b in zip(got['opt']['state'], want['opt']['state']):
        assert a.keys() == b.keys(), what
        for k in a:
            if isinstance(a[k], torch.Tensor): assert float((a[k] - b[k]).abs().max()) < TOL, f"{what}: optimizer {k}"
            else: assert a[k] == b[k], f"{what}: optimizer {k}"

@pytest.fixture(scope='module')
def local_fits() -> dict:
    fits = {name: sh.local_result(name) for name in sh.CASES}
    init = fh.params_of(sh.case_learner('sgd_fit_uneven_last').model)
    assert all(fh.max_abs_diff(f['state_dict'], init) > 1e-2 for f in fits.values()), "every local fit must move the weights"
    return fits

# ---------------------------------------------------------------- the local fit's model at any number of processes

@pytest.mark.parametrize('nprocs', [1, 2, 3, 4])
def test_split_batches_train_the_local_model(nprocs, local_fits, no_leftovers):
    """Every case (SGD and Adam, fit and fit_one_cycle, an uneven last batch, bs no multiple of nprocs, a last batch of
    one item, bs < nprocs, gradient accumulation) trained as `fit_ddp(split_batches=True)` trains it, in one launch:
    weights, every recorder row (training metrics too), every step's loss and the optimizer state equal the local fit's."""
    got = in_torchddp(nprocs, sh.fit_cases_in_worker, list(sh.CASES), gather=0, timeout=240)
    for name, want in local_fits.items():
        assert_same_fit(got[name], want, f"{name} at {nprocs} processes")
        assert len(want['recorder']['losses']) == 2 * -(-sh.CASES[name][0] // sh.CASES[name][1]), "an epoch has the local steps"

def test_split_batches_on_every_entry_point(local_fits, no_leftovers):
    """`learn.fit_ddp(..., split_batches=True)` and the function form apply the local fit's result to the caller's
    Learner (weights, rows, optimizer state); `learn.ddp(nprocs=3, split_batches=True).lr_find()` records the local
    per-step losses and suggests what a local `lr_find` suggests."""
    learn = sh.case_learner('adam_one_cycle_bs27')
    learn.ddp(nprocs=3, split_batches=True, progress=False).fit_one_cycle(2, 1e-2)
    from mpify_fastai.state import learner_result
    assert_same_fit(learner_result(learn), local_fits['adam_one_cycle_bs27'], 'learn.ddp(nprocs=3).fit_one_cycle')

    name = 'sgd_grad_accumulation'
    trained = mpify_fastai.fit_ddp(partial(sh.case_learner, name), 2, 0.1, nprocs=2, split_batches=True, progress=False,
                                   cbs=[GradientAccumulation(n_acc=40)])
    assert_same_fit(learner_result(trained), local_fits[name], 'function form with GradientAccumulation')

    learn, local = sh.case_learner('adam_one_cycle_bs27'), sh.case_learner('adam_one_cycle_bs27')
    found = learn.ddp(nprocs=3, split_batches=True).lr_find(num_it=40, show_plot=False)
    with local.no_bar(), local.no_logging(): want = local.lr_find(num_it=40, show_plot=False)
    got_losses, want_losses = [float(l) for l in learn.recorder.losses], [float(l) for l in local.recorder.losses]
    assert len(got_losses) == len(want_losses) == 40
    assert max(abs(a - b) / max(1., abs(b)) for a, b in zip(got_losses, want_losses)) < TOL   # relative where they grow
    assert learn.recorder.lrs == pytest.approx(local.recorder.lrs, rel=1e-9)
    assert found.valley == pytest.approx(want.valley, rel=1e-6)

def test_split_batches_travel_in_the_job_and_are_checked(tmp_path):
    "The option is in every entry point's signature, travels inside a torchrun job file, and a bad value fails at once."
    for entry in (Learner.fit_ddp, Learner.ddp, mpify_fastai.fit_ddp):
        p = inspect.signature(entry).parameters['split_batches']
        assert p.default is False and p.kind is inspect.Parameter.KEYWORD_ONLY
    learn = sh.case_learner('sgd_fit_uneven_last')
    job, _ = load_ddp_job(learn.save_ddp_job(tmp_path / 'job.pkl', 1, split_batches=True))
    assert job.ddp.split_batches is True
    assert learn.ddp(nprocs=2, split_batches=True).ddp.split_batches is True   # what a SLURM submission puts in its job
    with pytest.raises(TypeError, match='split_batches must be True or False'): learn.fit_ddp(1, nprocs=2, split_batches=1)

# ---------------------------------------------------------------- training metrics: the local batches, not the parts

@pytest.mark.parametrize('nprocs', [2, 3])
def test_split_batches_replay_training_metrics_on_the_local_batches(nprocs, no_leftovers):
    """With `train_metrics=True`, every user metric of user_metric_helpers' table, a batch count, a per-batch list of
    losses, the mean of per-batch accuracies, and fastai's `accuracy` (parts summed) and `F1Score` (predictions joined)
    log in every row what a local fit logs, to 1e-6: a replayed metric sees each step's parts joined into the local batch
    (bs 13, a last batch of 2: at 3 processes a rank has no item of it), once; validation rows too; nothing warns. After
    a fit cancelled inside a batch (as `lr_find` stops) every metric has its own `accumulate` again."""
    want, _, _ = sh.user_train_fit(False)
    got, inexact, wrapped = in_torchddp(nprocs, sh.user_train_fit, True, gather=0, timeout=240)
    assert not inexact and not wrapped, (inexact, wrapped)
    names = ['loss', *(m.name for m in sh.user_train_learner().metrics)]
    assert len(got) == len(want) == 2 and all(len(g) == len(w) == 2 * len(names) for g, w in zip(got, want))
    for epoch, (g, w) in enumerate(zip(got, want)):
        wrong = [(n, x, y) for n, x, y in zip(names * 2, g, w) if not abs(x - y) <= 1e-6 * max(1., abs(y))]
        assert not wrong, f"epoch {epoch} at {nprocs} processes: (metric, split, local) {wrong}"

# ---------------------------------------------------------------- how a loader is split

@pytest.mark.parametrize('world', [2, 3, 4])
@pytest.mark.parametrize('n,bs,shuffle,drop_last', [(23, 6, False, False), (23, 6, True, False), (23, 6, True, True),
                                                    (10, 3, True, False), (9, 3, False, False)])
def test_split_dl_parts_make_up_the_local_batches(world, n, bs, shuffle, drop_last):
    """Each rank steps as often as locally; in every batch the ranks' parts, in rank order, are one batch of the epoch
    (the local batch itself when unshuffled), the parts' sizes differ by at most one, and a rank without an item loads
    one, weighted 0. Undone, the loader is the local one again."""
    make = lambda: DataLoader(list(range(n)), bs=bs, shuffle=shuffle, drop_last=drop_last)
    local = [b.tolist() for b in make()]
    ranks = []
    for r in range(world):
        dl = make()
        saved, split = split_dl(dl, r, world, seed=7)
        batches = [b.tolist() for b in dl]
        assert len(dl) == len(batches) == len(local)
        ranks.append((batches, list(split.shares)))
        unshard_dl(dl, saved)
        assert [b.tolist() for b in dl] == local if not shuffle else len(dl) == len(local)
    epoch = []
    for k in range(len(local)):
        shares = [ranks[r][1][k] for r in range(world)]
        parts = [ranks[r][0][k][:mine] for r, (mine, _) in enumerate(shares)]
        assert all(len(ranks[r][0][k]) == max(1, mine) for r, (mine, _) in enumerate(shares))
        assert {total for _, total in shares} == {len(local[k])} and sum(m for m, _ in shares) == len(local[k])
        assert max(m for m, _ in shares) - min(m for m, _ in shares) <= 1
        whole = [i for p in parts for i in p]
        if not shuffle: assert whole == local[k]
        epoch += whole
    assert len(set(epoch)) == len(epoch) == sum(len(b) for b in local)

def test_split_dl_with_loader_workers_yields_the_same_parts():
    "With DataLoader worker processes (which take whole batches in turn) a rank's parts are those it loads without them."
    from fastai.data.core import TfmdDL
    def parts(workers: int) -> list[list[int]]:
        dl = TfmdDL(list(range(22)), bs=6, shuffle=True, num_workers=workers)
        split_dl(dl, 0, 4, seed=3)    # rank 0: 2 items of each batch of 6, 1 of the last one (4 items)
        return [b.tolist() for b in dl]
    assert parts(2) == parts(0) and [len(b) for b in parts(0)] == [2, 2, 2, 1]

def _loader_kinds() -> dict:
    "Training loaders whose epoch order comes from their own rng, numpy's or Python's global RNG, or a draw with replacement."
    import numpy as np
    import app_helpers as ah
    from fastai.callback.data import WeightedDL
    from fastai.data.core import TfmdDL
    from fastai.data.block import RegressionBlock
    from fastai.tabular.all import Categorify, TabularDataLoaders
    from fastai.text.data import SortedDL
    lengths = [(7 * i) % 23 + 1 for i in range(41)]
    tab = TabularDataLoaders.from_df(ah.tabular_df(150), procs=[Categorify], cat_names=['a'], cont_names=['x2'], y_names='y',
                                     y_block=RegressionBlock(), valid_idx=list(range(31)), bs=16)
    return dict(tfmd=TfmdDL(list(range(37)), bs=5, shuffle=True), weighted=WeightedDL(list(range(30)), bs=4, shuffle=True,
                wgts=np.arange(30.) + 1), sorted=SortedDL(list(range(41)), res=lengths, bs=6, shuffle=True),
                tabular=tab.train, user_shuffle_fn=ah.GlobalShuffleDL(list(range(29)), bs=4, shuffle=True),
                user_get_idxs=ah.OwnIdxsDL(list(range(30)), bs=4))

@pytest.mark.parametrize('kind', ['tfmd', 'weighted', 'sorted', 'tabular', 'user_shuffle_fn', 'user_get_idxs'])
def test_split_dl_of_every_loader_kind_is_the_local_epoch(kind):
    """For every kind of training loader, each epoch's ranks' parts (3 ranks), batch by batch in rank order, are the
    batches a local run draws with the same seed: `SortedDL` sorts and shuffles its batches at the local bs, a weighted
    or tabular loader draws once with replacement for every rank."""
    import copy
    from mpify_fastai.sharding import shard_dl
    dl, world, seed = _loader_kinds()[kind], 3, 11
    local = copy.deepcopy(dl)
    shard_dl(local, 0, 1, pad=True, seed=seed)     # one rank of one: the local epoch drawn from the same seed
    ranks = [copy.deepcopy(dl) for _ in range(world)]
    splits = [split_dl(r_dl, r, world, seed)[1] for r, r_dl in enumerate(ranks)]
    for epoch in range(2):
        want = [int(i) for i in local.get_idxs()][:len(dl) * dl.bs]
        drawn = [[int(i) for i in r_dl.get_idxs()] for r_dl in ranks]
        assert all(len(split.shares) == len(dl) for split in splits), "as many batches as locally"
        for k in range(len(dl)):
            parts = []
            for d, split in zip(drawn, splits):
                mine, total = split[k]
                parts += d[:mine]
                del d[:max(1, mine)]
            assert parts == want[k * dl.bs:k * dl.bs + total], f"{kind}, epoch {epoch}, batch {k}"
        assert drawn == [[]] * world

# ---------------------------------------------------------------- what does not hold exactly: BatchNorm on CPU ranks

def test_batchnorm_on_cpu_ranks_uses_each_ranks_share(no_leftovers):
    """On gloo CPU ranks, torch's SyncBatchNorm does not run (DDP: 'SyncBatchNorm layers only work with GPU modules'):
    BatchNorm normalizes each rank's part of the batch with that part's statistics, and the running statistics are rank
    0's. One split step at 2 processes equals a local step that normalizes each half apart, and differs from the local fit."""
    got = in_torchddp(2, sh.bn_step_in_worker, True, gather=0, timeout=120)
    learn = sh.bn_learner()
    x, y = learn.dls.train.one_batch()
    model = learn.model.train()
    out0 = model(x[:8])
    running = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}
    out1 = model(x[8:])
    loss = (learn.loss_func(out0, y[:8]) * 8 + learn.loss_func(out1, y[8:]) * 8) / 16
    loss.backward()
    with torch.no_grad():
        for p in model.parameters(): p -= 0.5 * p.grad
    ghost = {**fh.params_of(model), **running}
    assert fh.max_abs_diff(got, ghost) < TOL
    whole = sh.bn_learner()
    with whole.no_bar(), whole.no_logging(): whole.fit(1, 0.5)
    assert fh.max_abs_diff(got, fh.params_of(whole.model)) > 1e-3, "per-rank statistics must show against the whole batch's"

# ---------------------------------------------------------------- each rank draws its own, whatever the factory seeds

@pytest.mark.parametrize('split', [False, True])
def test_ranks_draw_their_own_dropout_and_augmentation(tmp_path, split, no_leftovers):
    """A factory that seeds every rank alike (`set_seed(42)` inside) still gives each rank its own dropout masks and
    augmentation draws, in both modes: the runner folds the rank into the global RNGs."""
    mpify_fastai.fit_ddp(partial(sh.seeded_learner, str(tmp_path)), 1, 1e-2, nprocs=2, split_batches=split, progress=False)
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert len(r0['draws']) == len(r1['draws']) > 0 and len(r0['mask']) == len(r1['mask']) > 0
    same = [what for what in ('draws', 'mask') if r0[what] == r1[what]]
    assert not same, f"the ranks drew the same {' and '.join(same)} (augmentation draws, dropout mask)"

# ---------------------------------------------------------------- slow: a language model, a torchrun job

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_language_model_split_by_streams_is_weighted():
    """A language model's loader is split by text streams in both modes; with bs=8 at 3 processes the ranks hold 2, 3 and
    3 streams, and `split_batches=True` weights their losses so the fit equals the local one (weights and rows to 1e-5)."""
    import numpy as np
    import app_helpers as ah
    from fastai.metrics import Perplexity, accuracy
    from fastai.text.all import AWD_LSTM, TextDataLoaders, language_model_learner
    def lm():
        dls = TextDataLoaders.from_df(df, text_col='text', valid_pct=0.2, bs=8, seq_len=16, is_lm=True, seed=0)
        dls.train.shuffle = False
        torch.manual_seed(0)
        return language_model_learner(dls, AWD_LSTM, pretrained=False, config=ah.awd_config(True), drop_mult=1e-9,
                                      metrics=[accuracy, Perplexity()])
    df = ah.sentences_df(160)
    local = lm()
    with local.no_bar(), local.no_logging(): local.fit(2, 1e-2)
    learn = lm()
    learn.fit_ddp(2, 1e-2, nprocs=3, split_batches=True, progress=False)
    assert fh.max_abs_diff(fh.params_of(learn.model), fh.params_of(local.model)) < TOL
    rows = lambda l: np.array([_numbers(r) for r in l.recorder.values])
    np.testing.assert_allclose(rows(learn), rows(local), rtol=TOL, atol=1e-6)

@pytest.mark.slow
def test_torchrun_job_trains_the_local_model(tmp_path, local_fits, no_leftovers):
    "`save_ddp_job(..., split_batches=True)` under `torchrun --nproc-per-node=3` writes the local fit's result."
    from helpers import free_port
    from test_job import RUN, rdzv, torchrun
    name = 'adam_one_cycle_bs27'
    sh.case_learner(name).save_ddp_job(tmp_path / 'job.pkl', 2, 1e-2, method='fit_one_cycle', split_batches=True)
    (rc, out), = torchrun([(rdzv(free_port(), 1, 3) + RUN, tmp_path)], tmp_path, timeout=240)
    assert rc == 0, out[-6000:]
    assert_same_fit(torch.load(tmp_path / 'result.pth', weights_only=False), local_fits[name], 'torchrun job')

@pytest.mark.slow
def test_slurm_job_trains_the_local_model(local_fits, executor, no_leftovers):
    "`learn.ddp(executor=ex, split_batches=True)`: one rank on each of two slurmd nodes, and the local fit's result applied."
    from mpify_fastai.state import learner_result
    name = 'adam_one_cycle_bs27'
    learn = sh.case_learner(name)
    learn.ddp(executor=executor, split_batches=True, progress=False).fit_one_cycle(2, 1e-2)
    assert_same_fit(learner_result(learn), local_fits[name], 'SLURM job')
