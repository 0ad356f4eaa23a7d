"""Inference figure: `learn.ddp(nprocs=2).get_preds()` against a local `learn.get_preds()` on a 20,000-item test set
through a small CNN, wall time with the launch included, both measured in this run (median of alternating repeats).

Run: `python bench/bench_inference.py [--items 20000] [--repeats 3]`; prints one Markdown table row and the method."""
from __future__ import annotations
import argparse, statistics, time
import torch
from torch import nn

def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))

def learner(n_items: int):
    "A Learner whose validation set is `n_items` synthetic 3x32x32 images (what get_preds predicts)."
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n_items, 3, 32, 32, generator=g), torch.randint(0, 10, (n_items,), generator=g)
    ds = list(zip(X, y))
    return Learner(DataLoaders.from_dsets(ds[:256], ds, bs=256), cnn(), loss_func=CrossEntropyLossFlat())

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--items', type=int, default=20_000)
    p.add_argument('--repeats', type=int, default=3)
    a = p.parse_args(argv)
    import mpify_fastai  # noqa: F401  (Learner.ddp)
    learn = learner(a.items)
    learn.ddp(nprocs=2).get_preds()     # the session's warm server starts once, as in a notebook
    local, ddp = [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        with learn.no_bar(): ref = learn.get_preds()
        local.append(time.perf_counter() - t)
        t = time.perf_counter(); res = learn.ddp(nprocs=2).get_preds(); ddp.append(time.perf_counter() - t)
        assert torch.allclose(res[0], ref[0], atol=1e-5) and torch.equal(res[1], ref[1])
    lo, dd = statistics.median(local), statistics.median(ddp)
    print(f"| get_preds on {a.items:,} items (3x32x32, small CNN), `learn.ddp(nprocs=2).get_preds()` vs local "
          f"`get_preds()` ({torch.get_num_threads()} threads), launch included | {dd:.2f} s | {lo:.2f} s | "
          f"{dd / lo:.2f}x (floor <= 0.8) |")
    print(f"repeats: ddp {[round(x, 2) for x in ddp]}, local {[round(x, 2) for x in local]}")

if __name__ == '__main__': main()
