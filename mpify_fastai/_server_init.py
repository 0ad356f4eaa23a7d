"""Imported first by the warm fork server, before torch: its environment, set there and not in the caller's.
A CUDA availability probe in the server must not initialise CUDA, and the server must not pre-warm a server.
Warnings raised by the server's own imports (torch's, fastai's) stay out of the notebook's cell, which already showed
them at its own imports; `worker_filters` gives a forked worker the filters the server started with, so what a worker
warns about during a run still reaches the caller."""
import os, warnings
os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'] = '1'
os.environ['MPIFY_PREWARM'] = '0'
_FILTERS = list(warnings.filters)
warnings.simplefilter('ignore')

def worker_filters() -> list:
    "The warning filters of the process that started the server, for a worker forked from it."
    return list(_FILTERS)
