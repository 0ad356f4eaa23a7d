"""`learn.ddp(n).get_preds / validate / tta / lr_find`: each rank works on its own shard (or its share of a mock fit),
and the caller gets what the local call returns, exactly, on real processes and real gloo groups."""
import pytest
import torch
import torch.nn.functional as F
import mpify_fastai
from mpify_fastai import WorkerError
from fastai_helpers import digits_xy, params_of, bitwise_equal
from inference_helpers import FailInValidation, digits_tfmd_learner

pytestmark = pytest.mark.usefixtures('no_leftovers')

@pytest.fixture(scope='module')
def trained():
    "A Learner trained one epoch locally: its predictions are not trivial."
    learn = digits_tfmd_learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
    return learn

def _same(a, b, tol=1e-5):
    "Equal structure (tuple lengths, types, shapes), values within `tol`."
    if isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b): _same(x, y, tol)
    elif a is None: assert b is None
    else:
        assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype, (type(a), type(b), a.shape, b.shape)
        assert float((a.double() - b.double()).abs().max()) <= tol if a.numel() else True

@pytest.mark.parametrize('nprocs', [2, 3])   # 203 items: shards of 102/101 and 68/68/67
def test_get_preds_equals_local(trained, nprocs):
    "Same tuple, types, order and values as a local get_preds, with inputs, decoded and losses; uneven shards; no duplicates."
    with trained.no_bar(): local = trained.get_preds(with_input=True, with_decoded=True, with_loss=True)
    before = params_of(trained.model)
    res = trained.ddp(nprocs=nprocs).get_preds(with_input=True, with_decoded=True, with_loss=True)
    _same(res, local)
    assert len(res[1]) == 203 and bitwise_equal(params_of(trained.model), before)

def test_get_preds_reorder_false_test_dl_and_validate(trained):
    "reorder=False keeps the DataLoader's order; a test_dl built here works; validate equals the local one (1e-4)."
    test_dl = trained.dls.test_dl(list(range(600, 737)))   # 137 new items
    with trained.no_bar():
        local_nr, local_test = trained.get_preds(reorder=False), trained.get_preds(dl=test_dl, with_decoded=True)
        local_val = trained.validate()
    ddp = trained.ddp(nprocs=2)
    _same(ddp.get_preds(reorder=False), local_nr)
    _same(ddp.get_preds(dl=test_dl, with_decoded=True), local_test)
    assert list(map(float, ddp.validate())) == pytest.approx(list(map(float, local_val)), abs=1e-4)

def test_tta_equals_local(trained):
    "tta with a deterministic training-time augmentation equals the local tta (and differs from plain predictions)."
    with trained.no_bar(): local, plain = trained.tta(n=2), trained.get_preds()
    res = trained.ddp(nprocs=2).tta(n=2)
    _same(res, local)
    assert float((res[0] - plain[0]).abs().max()) > 1e-4   # the augmentation did something

def test_lr_find_global_batch_loss_and_untouched_weights():
    "lr_find returns SuggestedLRs, fills the recorder (plot works), leaves weights and optimizer as they were; its first loss is that of the global batch (both ranks' first batches)."
    learn = digits_tfmd_learner(bs=16, shuffle=False)
    learn.create_opt()
    before, opt_before = params_of(learn.model), learn.opt.state_dict()
    learn.recorder.values, learn.recorder.iters = [[9., 9.]], [7]   # an earlier fit's rows: lr_find replaces them, as locally
    sug = learn.ddp(nprocs=2).lr_find(num_it=20, show_plot=False)
    local = digits_tfmd_learner(bs=16, shuffle=False)
    with local.no_bar(), local.no_logging(): local.lr_find(num_it=20, show_plot=False)
    assert (learn.recorder.values, learn.recorder.iters) == (local.recorder.values, local.recorder.iters)
    assert type(sug).__name__ == 'SuggestedLRs' and sug._fields == ('valley',) and 1e-7 < sug.valley < 10
    assert len(learn.recorder.lrs) == len(learn.recorder.losses) == 20 and learn.recorder.lrs[0] < learn.recorder.lrs[-1]
    assert bitwise_equal(params_of(learn.model), before)
    assert repr(learn.opt.state_dict()) == repr(opt_before)
    X, y = digits_xy()
    with torch.no_grad(): first = F.cross_entropy(learn.model(X[:32].flip(-1)), y[:32])   # mirrored: training items
    # ranks 0 and 1 took items 0,2,.. and 1,3,..: together the first 32
    assert float(learn.recorder.losses[0]) == pytest.approx(float(first), abs=1e-5)
    learn.recorder.plot_lr_find()

def test_failure_during_inference_names_rank_and_keeps_learner(trained):
    "A worker failing while predicting: WorkerError naming rank 1, and the Learner is untouched."
    before = params_of(trained.model)
    with pytest.raises(WorkerError, match='rank 1 raised RuntimeError: .*planned failure on rank 1') as ei:
        trained.ddp(nprocs=2).get_preds(cbs=[FailInValidation(1)])
    assert 'while predicting' in str(ei.value) and bitwise_equal(params_of(trained.model), before)

def test_unknown_method_lists_every_supported_one(trained):
    "An unknown method names all that learn.ddp(...) can run, schedules and inference alike, before anything starts."
    with pytest.raises(AttributeError) as ei: trained.ddp(nprocs=2).predict
    for m in mpify_fastai.learner.METHODS: assert m in str(ei.value)
    with pytest.raises(TypeError): trained.ddp(nprocs=2).get_preds(no_such_argument=1)
