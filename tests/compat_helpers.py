"""Worker functions and contexts for the mpify-compatibility tests (workers import this module by name; importing
it loads no torch: `mpify_fastai.group` imports torch only when a group is made)."""
from __future__ import annotations
import os
from pathlib import Path
from mpify_fastai.group import TorchDDPCtx

def group_facts() -> dict:
    "What a rank sees inside `ranch(ctx=TorchDDPCtx())`: its group, a collective, and how the group was made."
    import torch, torch.distributed as dist
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dict(initialized=dist.is_initialized(), rank=dist.get_rank(), world=dist.get_world_size(), sum=t.item(),
                backend=dist.get_backend(), init=os.environ.get('MPIFY_INIT_METHOD', ''),
                ifname=os.environ.get('GLOO_SOCKET_IFNAME'), threads=torch.get_num_threads())

class TeardownProbe(TorchDDPCtx):
    "A TorchDDPCtx that writes, per rank, whether the group still exists once it has left it."
    def __init__(self, folder: str, **kw):
        super().__init__(**kw)
        self.folder = folder
    def __exit__(self, *exc):
        import torch.distributed as dist
        res = super().__exit__(*exc)
        Path(self.folder, f"after-{os.environ['RANK']}").write_text(str(dist.is_initialized()))
        return res
