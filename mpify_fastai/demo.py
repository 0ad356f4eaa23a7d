"""The main job, end to end: `python -m mpify_fastai.demo` trains a CNN on scikit-learn's digits with `fit_ddp`
on 2 CPU processes, prints the metrics table and wall time, and checks the parent's `validate()` against it."""
from __future__ import annotations
import argparse, time

def digits_dls(bs: int = 64, n_valid: int = 361):
    "DataLoaders over scikit-learn's bundled 8x8 digits (1797 images), no download needed."
    import torch
    from fastai.data.core import DataLoaders
    from sklearn.datasets import load_digits
    d = load_digits()
    X, y = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16., torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(X), generator=g)
    ds = [(X[i], y[i]) for i in order.tolist()]
    return DataLoaders.from_dsets(ds[n_valid:], ds[:n_valid], bs=bs)   # fastai's defaults: shuffle the training set only

def digits_cnn():
    from torch import nn
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--nprocs', type=int, default=2)
    a = p.parse_args(argv)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    learn = Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    t0 = time.perf_counter()
    learn.ddp(nprocs=a.nprocs).fit_one_cycle(a.epochs, 1e-2)
    wall = time.perf_counter() - t0
    last = [float(v) for v in learn.recorder.values[-1]]
    with learn.no_bar(): val = [float(v) for v in learn.validate()]
    ok = all(abs(x - y) < 1e-4 for x, y in zip(last[1:], val))
    print(f"\nfit_ddp: {a.epochs} epochs on {a.nprocs} processes in {wall:.1f} s (wall, including worker start)")
    print(f"last epoch (valid_loss, accuracy): {last[1]:.6f}, {last[2]:.6f}")
    print(f"learn.validate() in the parent:    {val[0]:.6f}, {val[1]:.6f}  -> {'match' if ok else 'MISMATCH'}")
    return 0 if ok else 1

if __name__ == '__main__': raise SystemExit(main())
