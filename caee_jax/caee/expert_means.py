"""Calibrated per-expert mean outputs for `mean` compensation: the file, checked reading, setting into a model.

For MoE layer l and routed expert e, means[l, e] [D] is e's unweighted SwiGLU output averaged over the
calibration tokens the router sends to e (native top-k, nothing pruned); counts[l, e] is the number of
those tokens (0: never routed, and its mean is the zero vector). They are measured by
`caee_jax/calibration/expert_means.py`.

Calibrate on text the evaluation never sees (for the bundled model: its training corpus, never
`heldout.txt`): means measured on the evaluation text would leak it into the pruned model.

The file (.npz, written atomically) holds `means` [L, E, D] f32, `counts` [L, E] int64 and int scalars
`tokens` (calibration tokens), `num_moe_layers`, `n_routed_experts`, `hidden_size`, `num_experts_per_tok`,
plus `format` and `version`; reading checks them against the model and names the field at fault.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import NamedTuple

import numpy as np

from caee_jax.caee import npz_fields
from caee_jax.config import ModelConfig
from caee_jax.files import atomic_write

FORMAT = "caee-expert-means"
VERSION = 1
FILENAME = "expert_means.npz"  # its default place: next to the checkpoint (launch/eval.py, launch/run.py)
DIMS = ("num_moe_layers", "n_routed_experts", "hidden_size", "num_experts_per_tok")


class ExpertMeansError(ValueError):
    """An expert-means file that is missing, unreadable or made for another model."""


class Calibration(NamedTuple):
    """means [L_moe, E, D] f32; counts [L_moe, E] int64: routed tokens per expert; tokens: calibration tokens."""

    means: np.ndarray
    counts: np.ndarray
    tokens: int


def default_path(model_dir: str) -> str:
    return os.path.join(model_dir, FILENAME)


def save(path: str, result: Calibration, config: ModelConfig) -> None:
    """Writes the file atomically (`files.atomic_write`)."""
    fields = dict(format=np.str_(FORMAT), version=np.int64(VERSION), tokens=np.int64(result.tokens))
    fields |= {name: np.int64(getattr(config, name)) for name in DIMS}
    fields |= dict(means=np.asarray(result.means, np.float32), counts=np.asarray(result.counts, np.int64))
    with atomic_write(path, "wb") as f:
        np.savez(f, **fields)


def read(path: str, config: ModelConfig) -> Calibration:
    """The file at `path`, checked against `config`; ExpertMeansError names the file and the field at fault."""
    if not os.path.isfile(path):
        raise ExpertMeansError(f"{path}: no such expert-means file (make one with launch/calibrate_means.py)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ExpertMeansError(f"{path}: not an expert-means .npz file ({error})") from error
    with archive:
        header = dict(format=FORMAT, version=VERSION, dims=DIMS, config=config)
        npz_fields.check_header(archive, path, ExpertMeansError, **header)
        field = functools.partial(npz_fields.field, archive, path, error=ExpertMeansError)
        integer = functools.partial(npz_fields.integer, archive, path, error=ExpertMeansError)
        tokens = integer("tokens")
        shape = (config.num_moe_layers, config.n_routed_experts, config.hidden_size)
        means, counts = field("means"), field("counts")
    if means.shape != shape or means.dtype != np.float32:
        raise ExpertMeansError(f"{path}: field 'means' is {means.dtype} {means.shape}; expected float32 {shape}")
    if not np.isfinite(means).all():
        raise ExpertMeansError(f"{path}: field 'means' holds non-finite values")
    if counts.shape != shape[:2] or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ExpertMeansError(f"{path}: field 'counts' must be non-negative integers of shape {shape[:2]}")
    pairs = tokens * config.num_experts_per_tok
    if (counts.sum(-1) != pairs).any():
        raise ExpertMeansError(
            f"{path}: field 'counts' sums to {counts.sum(-1).tolist()} per layer; 'tokens' x top-k is {pairs}"
        )
    return Calibration(means, counts.astype(np.int64), tokens)


def load_means(model, path: str) -> Calibration:
    """Reads the file (checked against the model) and sets its means into `model` (a `caee_jax.Model`)."""
    result = read(path, model.config)
    model.set_expert_means(result.means)
    return result
