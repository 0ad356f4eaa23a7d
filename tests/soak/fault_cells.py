"""The kernel side of the fault campaign: the Learner, the test callbacks, and `trial()`, which runs one
`learn.ddp(2).fit_one_cycle(6)` and checks what it left (executed in the kernel as one setup cell)."""

EVENTS = ('before_fit', 'before_epoch', 'before_train', 'after_batch', 'after_train', 'before_validate', 'after_validate',
          'after_epoch', 'after_fit')   # where a fault of kind c raises

SETUP = r'''
import glob, json, os, shutil, signal, tempfile, time, torch
from pathlib import Path
from fastai.basics import *
from fastai.callback.schedule import *
import mpify_fastai, helpers
from mpify_fastai.demo import digits_dls, digits_cnn
from mpify_fastai.errors import LaunchError
dls = digits_dls(bs=32)
FOLDER = Path(tempfile.mkdtemp(prefix='soak-faults-'))

def plain_state(model):
    "A model's state_dict on the CPU, a DDP wrapper's prefix removed."
    m = getattr(model, 'module', model)
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

class SaveEpochs(Callback):
    "Rank 0 saves the weights of each epoch it ends, before the package's checkpoint (order 70), and notes its pid."
    rank0_only, order = True, 65
    def __init__(self, folder): self.folder = folder
    def after_epoch(self): torch.save(plain_state(self.model), f'{self.folder}/epoch-{self.epoch}.pth')

class NotePid(Callback):
    "Every rank writes its pid when the fit begins (where the test looks for a rank to kill)."
    def __init__(self, folder): self.folder = folder
    def before_fit(self): Path(self.folder, f"pid-{os.environ['RANK']}").write_text(str(os.getpid()))

EVENTS = ('before_fit', 'before_epoch', 'before_train', 'after_batch', 'after_train', 'before_validate', 'after_validate',
          'after_epoch', 'after_fit')

class RaiseAt(Callback):
    "Raise in event `event` of epoch `epoch` on rank `rank` (the fault of kind c)."
    def __init__(self, event, epoch, rank): self.event, self.at, self.rank = event, epoch, rank
    def _maybe(self, event):
        if event == self.event and int(os.environ['RANK']) == self.rank and (event.endswith('_fit') or self.epoch == self.at):
            raise RuntimeError(f'fault: {event} of epoch {self.at} on rank {self.rank}')
    def before_fit(self): self._maybe('before_fit')
    def before_epoch(self): self._maybe('before_epoch')
    def before_train(self): self._maybe('before_train')
    def after_batch(self): self._maybe('after_batch')
    def after_train(self): self._maybe('after_train')
    def before_validate(self): self._maybe('before_validate')
    def after_validate(self): self._maybe('after_validate')
    def after_epoch(self): self._maybe('after_epoch')
    def after_fit(self): self._maybe('after_fit')

def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def mine(root): return sorted(glob.glob(f'{root}/mpify-{os.getpid()}-*'))

def new_shm(before):
    "Entries that appeared in this kernel's private /dev/shm since `before` (the test's filler aside); removed once reported."
    new = sorted(set(os.listdir('/dev/shm')) - before - {'filler'})
    for n in new: os.unlink(f'/dev/shm/{n}')
    return new

def trial(i, raise_at=None, epochs=6):
    "One faulted run: print START, fit, then report the error, what the Learner holds and what was left (RESULT line)."
    folder = FOLDER / f'run-{i}'; folder.mkdir()
    learn = Learner(dls, digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    before = plain_state(learn.model)
    cbs = [SaveEpochs(str(folder)), NotePid(str(folder))] + ([RaiseAt(*raise_at)] if raise_at else [])
    out, late, shm = dict(i=i, error=None), [], set(os.listdir('/dev/shm'))
    print(f'START {i}', flush=True)
    t0 = time.monotonic()
    try:
        try: learn.ddp(nprocs=2).fit_one_cycle(epochs, 1e-2, cbs=cbs)
        finally: signal.signal(signal.SIGINT, lambda *a: late.append(time.monotonic() - t0))   # an interrupt after the call
    except BaseException as e:
        out.update(error=type(e).__name__, documented=isinstance(e, (LaunchError, KeyboardInterrupt)), message=str(e)[:300])
        if getattr(e, 'checkpoint', None):   # a failure keeps the last completed epoch in a named file
            ck = torch.load(e.checkpoint, weights_only=False)
            out['kept_epoch'] = ck['completed_epoch']
            out['kept_ok'] = same(ck['state_dict'], torch.load(folder / f"epoch-{ck['completed_epoch']}.pth"))
            os.unlink(e.checkpoint)
    out['seconds'] = time.monotonic() - t0
    out['late_interrupt'] = late
    now = plain_state(learn.model)
    saved = {int(p.stem.split('-')[1]): torch.load(p) for p in folder.glob('epoch-*.pth')}
    held = [k for k, sd in saved.items() if same(now, sd)]
    rows = len(getattr(learn.recorder, 'values', []))
    out['learner'] = ('untouched' if same(now, before) and rows == 0 else
                      f'epoch {held[0]}' if len(held) == 1 and rows == held[0] + 1 and learn.epoch == held[0] else
                      f'BAD (matches {held}, {rows} rows, epoch {getattr(learn, "epoch", None)})')
    out['procs'] = [c['cmdline'][:80] or c['comm'] for c in helpers.leftover_processes(grace=8)]
    time.sleep(0.2)
    out['shm'] = new_shm(shm)
    out['tmp'] = mine(tempfile.gettempdir())
    shutil.rmtree(folder)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print('RESULT ' + json.dumps(out), flush=True)

def next_call():
    "The call after a fault must succeed: one epoch on a fresh Learner, nothing left."
    learn = Learner(dls, digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    t0, shm = time.monotonic(), set(os.listdir('/dev/shm'))
    learn.ddp(nprocs=2).fit_one_cycle(1, 1e-2)
    print('RESULT ' + json.dumps(dict(next_ok=len(learn.recorder.values) == 1, seconds=time.monotonic() - t0,
                                      procs=len(helpers.leftover_processes(grace=8)), shm=new_shm(shm),
                                      tmp=mine(tempfile.gettempdir()))), flush=True)
'''
