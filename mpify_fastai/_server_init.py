"""Imported first by the warm fork server, before torch: its environment, set there and not in the caller's.
A CUDA availability probe in the server must not initialise CUDA, and the server must not pre-warm a server."""
import os
os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'] = '1'
os.environ['MPIFY_PREWARM'] = '0'
