"""Pallas grouped-expert kernels behind `run_experts(..., backend="pallas")`; see docs/KERNELS.md.

layout.py    kept pairs sorted by expert, row tiles, the (tile, expert) work list
tpu.py       Mosaic TPU kernel: scalar-prefetched work list drives the weight BlockSpecs
gpu.py       Triton GPU kernel: guarded, row-masked loads inside the body
dispatch.py  run_pallas: checks, block defaults, gather, kernel, weighted scatter-add
"""

from caee_jax.pallas.dispatch import default_blocks, run_pallas

__all__ = ["default_blocks", "run_pallas"]
