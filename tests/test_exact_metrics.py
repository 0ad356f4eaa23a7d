"""Exact by construction: every metric fastai exports, and a user's metric of every accumulator shape, give under DDP
the values a local `validate()` gives on the same weights (nprocs 2, 3, 4; a validation set of 203 items, a multiple
of neither bs=16 nor bs * nprocs), in `learn.ddp(n).validate()`, in the rows `fit_ddp` logs, and in training metrics."""
import warnings
import pytest
import fastai.metrics as fm
import metric_helpers as mh
from fastai_helpers import digits_dls_plain, mlp, sgd_learner

pytestmark = [pytest.mark.usefixtures('no_leftovers'),
              pytest.mark.filterwarnings('ignore::UserWarning'), pytest.mark.filterwarnings('ignore::RuntimeWarning')]

def _close(a, b, tol=1e-5) -> bool:
    return all(abs(float(x) - float(y)) <= tol * max(1., abs(float(y))) for x, y in zip(a, b, strict=True))

def _trained(kind: str):
    learn = mh.metric_learner(kind)
    with learn.no_logging(): learn.fit(1)
    return learn

def test_the_table_covers_every_export_of_fastai_metrics():
    "Each name fastai.metrics exports is in the table, or left out with a reason."
    missing = set(fm.__all__) - {name for name, _, _ in mh.TABLE} - set(mh.LEFT_OUT)
    assert not missing, f"metrics neither checked nor listed as left out: {sorted(missing)}"

@pytest.mark.parametrize('nprocs', [2, 3, 4])
@pytest.mark.parametrize('kind', mh.KINDS)
def test_every_metric_validates_as_locally(kind, nprocs):
    "learn.ddp(n).validate() equals learn.validate() for every metric of the table, to 1e-5."
    learn = _trained(kind)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        local = learn.validate()
    names = [m.name for m in learn.metrics]
    ddp = learn.ddp(nprocs).validate()
    assert len(ddp) == len(local) == len(names) + 1
    wrong = [(n, float(d), float(l)) for n, d, l in zip(['loss'] + names, ddp, local) if not _close([d], [l])]
    assert not wrong, f"{kind}, {nprocs} ranks: (metric, ddp, local) differ: {wrong}"

@pytest.mark.parametrize('kind', ['custom', 'segmentation', 'sequence'])
def test_fit_ddp_rows_equal_a_local_validate(kind):
    "The row fit_ddp logs (the DistributedRunner's own combining) equals a local validate() on the weights it returns."
    learn = mh.metric_learner(kind)
    learn.fit_ddp(1, nprocs=3, progress=False)
    row = [float(v) for v in learn.recorder.values[-1][1:]]     # read before validate() replaces it
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        local = [float(v) for v in learn.validate()]
    assert _close(row, local), (row, local)

def test_a_metric_without_a_whole_set_value_warns_and_names_itself(capfd):
    "A metric whose reset() leaves nothing, or None, reports each rank's own value with a warning naming it and why."
    learn = mh.metric_learner('custom')
    learn.metrics = [mh.LastBatchAccuracy(), mh.NoneStart(), fm.accuracy]
    learn.ddp(2).validate()
    text = capfd.readouterr().err
    assert 'metric LastBatchAccuracy: its reset() assigns nothing' in text
    assert 'metric NoneStart: its reset() leaves None' in text and "[] for a list that grows" in text

def test_training_metrics_combine_across_ranks():
    "With train_metrics=True (lr 0, no dropout or BatchNorm: each item's prediction is fixed) the training columns equal a local fit's: every training item counted once."
    def make():
        learn = sgd_learner(digits_dls_plain(192, 64, bs=16, shuffle=True), mlp(), lr=0.,
                            metrics=[fm.accuracy, mh.PerItemMedian(), mh.IntCounter(), mh.ClassCounts()])
        learn.recorder.train_metrics = True
        return learn
    local = make()
    with local.no_logging(): local.fit(1)
    learn = make()
    learn.fit_ddp(1, nprocs=2, progress=False)
    names = list(learn.recorder.metric_names)
    train_cols = [i for i, n in enumerate(names) if n.startswith('train_') and n != 'train_loss']
    assert len(train_cols) == 4, names
    ddp_row, local_row = learn.recorder.values[-1], local.recorder.values[-1]
    assert _close([ddp_row[i - 1] for i in train_cols], [local_row[i - 1] for i in train_cols]), (ddp_row, local_row)
    assert ddp_row[train_cols[2] - 1] > 0
