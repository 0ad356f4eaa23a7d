"""Learners and callbacks for the inference tests: a Datasets-based digits Learner (so `test_dl` and `tta` work), with
a deterministic training-time augmentation, and a callback that fails on one rank. Workers import this module by name."""
from __future__ import annotations
import os
import torch
from fastai.callback.core import Callback
from fastai.data.core import Datasets
from fastai.data.transforms import Categorize
from fastai.data.core import Transform   # fasttransform on fastai 2.8, fastcore on 2.7
from fastai_helpers import digits_xy, mlp, sgd_learner

class Mirror(Transform):
    "Flips each image left to right: a training-time (split 0) augmentation with no randomness, so `tta` is reproducible."
    split_idx = 0
    def encodes(self, x: torch.Tensor): return x.flip(-1)

def _image(i: int) -> torch.Tensor: return digits_xy()[0][i]
def _label(i: int) -> int: return int(digits_xy()[1][i])

def digits_tfmd_learner(n_train: int = 400, n_valid: int = 203, bs: int = 32, shuffle: bool = True, **kw):
    "A Learner over `Datasets` of digit indices: the last `n_valid` of the first n_train+n_valid digits validate."
    from fastai.metrics import accuracy
    dsets = Datasets(range(n_train + n_valid), tfms=[[_image], [_label, Categorize()]],
                     splits=[list(range(n_train)), list(range(n_train, n_train + n_valid))])
    dls = dsets.dataloaders(bs=bs, shuffle=shuffle, after_item=[Mirror()])
    return sgd_learner(dls, mlp(), metrics=accuracy, **kw)

class FailInValidation(Callback):
    "Raise on rank `rank` at its first validation batch."
    def __init__(self, rank: int = 1): self.fail_rank = rank
    def before_batch(self):
        if not self.training and int(os.environ.get('RANK', 0)) == self.fail_rank:
            raise RuntimeError(f"planned failure on rank {self.fail_rank} while predicting")
