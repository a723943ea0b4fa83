"""Calibrated per-expert mean outputs for `mean` compensation: measured on text, stored in a file, set into a model.

For MoE layer l and routed expert e, means[l, e] [D] is e's unweighted SwiGLU output averaged over the
calibration tokens the router sends to e (native top-k, nothing pruned); counts[l, e] is the number of
those tokens (0: never routed, and its mean is the zero vector). The model sums the outputs in the
forward pass that routes them (`Execution(collect_expert_sums=True)`): one row per routed (token, expert)
pair, never an output for every expert and every token.

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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from caee_jax.config import ModelConfig
from caee_jax.model.execution import Execution
from caee_jax.parallel.placement import batch_sharding, check_batch, gather_replicated, mesh_context, to_mesh

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


@functools.partial(jax.jit, static_argnames=("graphdef", "execution"))
def _batch_sums(graphdef, state, tokens, execution: Execution):
    """tokens [B, T] -> (expert output sums [L, E, D] f32, routed pairs per expert [L, E] int32)."""
    model = nnx.merge(graphdef, state)
    routing = model(tokens, execution=execution).routing
    count = functools.partial(jnp.bincount, length=model.config.n_routed_experts)
    counts = jax.vmap(lambda ids: count(ids.reshape(-1)))(routing.topk_ids)
    return gather_replicated(routing.expert_sums), gather_replicated(counts)


def calibrate(
    model, ids: np.ndarray, *, tokens: int, seq_len: int = 256, batch_size: int = 8, progress: bool = True
) -> Calibration:
    """Mean expert outputs of `model` (a `caee_jax.Model`) over the token stream ids [M].

    The stream is cut into consecutive windows of `seq_len` tokens, each run as its own sequence (positions
    0..seq_len-1), `batch_size` windows per forward pass; at least `tokens` tokens in whole batches, as many
    as the stream holds. Sums accumulate in float64.
    """
    config = model.config
    windows = len(ids) // seq_len
    batches = min(windows // batch_size, -(-tokens // (seq_len * batch_size)))
    if batches < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens; need at least {seq_len * batch_size}")
    check_batch(model.mesh, batch_size)
    stream = np.asarray(ids[: batches * batch_size * seq_len], np.int32).reshape(batches, batch_size, seq_len)
    execution = Execution(model.execution.backend, dispatch=model.execution.dispatch, collect_expert_sums=True)
    sums = np.zeros((config.num_moe_layers, config.n_routed_experts, config.hidden_size), np.float64)
    counts = np.zeros(sums.shape[:2], np.int64)
    bar = tqdm(total=stream.size, desc="expert means", unit="tok", unit_scale=True, disable=not progress)
    with mesh_context(model.mesh), bar:
        for batch in stream:
            batch = jnp.asarray(batch) if model.mesh is None else to_mesh(batch, batch_sharding(model.mesh, 2))
            batch_sums, batch_counts = _batch_sums(model.graphdef, model.state, batch, execution)
            sums += np.asarray(batch_sums, np.float64)
            counts += np.asarray(batch_counts, np.int64)
            bar.update(batch.size)
    means = sums / np.maximum(counts, 1)[..., None]
    return Calibration(means.astype(np.float32), counts, int(stream.size))


def save(path: str, result: Calibration, config: ModelConfig) -> None:
    """Writes the file atomically: a temporary file next to `path`, fsynced, then renamed over it."""
    fields = dict(format=np.str_(FORMAT), version=np.int64(VERSION), tokens=np.int64(result.tokens))
    fields |= {name: np.int64(getattr(config, name)) for name in DIMS}
    fields |= dict(means=np.asarray(result.means, np.float32), counts=np.asarray(result.counts, np.int64))
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **fields)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: str, config: ModelConfig) -> Calibration:
    """The file at `path`, checked against `config`; ExpertMeansError names the file and the field at fault."""
    if not os.path.isfile(path):
        raise ExpertMeansError(f"{path}: no such expert-means file (make one with launch/calibrate_means.py)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ExpertMeansError(f"{path}: not an expert-means .npz file ({error})") from error
    with archive:
        field = functools.partial(_field, archive, path)
        if str(field("format")) != FORMAT:
            raise ExpertMeansError(f"{path}: field 'format' is {str(field('format'))!r}, not {FORMAT!r}")
        integer = functools.partial(_integer, field, path)
        if integer("version") != VERSION:
            raise ExpertMeansError(f"{path}: field 'version' is {integer('version')}; this reader knows {VERSION}")
        for name in DIMS:
            stored, expected = integer(name), getattr(config, name)
            if stored != expected:
                raise ExpertMeansError(f"{path}: field {name!r} is {stored}; the model has {expected}")
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


def _field(archive, path: str, name: str) -> np.ndarray:
    if name not in archive.files:
        raise ExpertMeansError(f"{path}: missing field {name!r}")
    try:
        return archive[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ExpertMeansError(f"{path}: field {name!r} is unreadable ({error})") from error


def _integer(field, path: str, name: str) -> int:
    value = field(name)
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ExpertMeansError(f"{path}: field {name!r} is {value.dtype} {value.shape}; expected an integer scalar")
    return int(value)


def load_means(model, path: str) -> Calibration:
    """Reads the file (checked against the model) and sets its means into `model` (a `caee_jax.Model`)."""
    result = read(path, model.config)
    model.set_expert_means(result.means)
    return result
