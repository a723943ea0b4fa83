"""Measuring each routed expert's mean output on calibration text, for `mean` compensation.

The model sums the outputs in the forward pass that routes them (`steps.expert_sums`): one row per
routed (token, expert) pair, never an output for every expert and every token. The file format and
its checked reading are in `caee/expert_means.py`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from caee_jax.caee.expert_means import Calibration
from caee_jax.model.execution import Execution
from caee_jax.parallel.placement import batch_sharding, check_batch, mesh_context, to_mesh
from caee_jax.runtime import steps


def calibration_batches(model, ids, tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """[batches, batch_size, seq_len] int32: consecutive windows of the token stream ids [M], at least
    `tokens` tokens in whole batches, as many as the stream holds (a too-short stream is a ValueError)."""
    batches = min(len(ids) // seq_len // batch_size, -(-tokens // (seq_len * batch_size)))
    if batches < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens; need at least {seq_len * batch_size}")
    check_batch(model.mesh, batch_size)
    return np.asarray(ids[: batches * batch_size * seq_len], np.int32).reshape(batches, batch_size, seq_len)


def calibrate(
    model, ids: np.ndarray, *, tokens: int, seq_len: int = 256, batch_size: int = 8, progress: bool = True
) -> Calibration:
    """Mean expert outputs of `model` (a `caee_jax.Model`) over the token stream ids [M].

    The stream is cut into consecutive windows of `seq_len` tokens, each run as its own sequence (positions
    0..seq_len-1), `batch_size` windows per forward pass; at least `tokens` tokens in whole batches, as many
    as the stream holds. Sums accumulate in float64.
    """
    config = model.config
    stream = calibration_batches(model, ids, tokens, seq_len, batch_size)
    execution = Execution(model.execution.backend, dispatch=model.execution.dispatch)  # native routing, no pruning
    sums = np.zeros((config.num_moe_layers, config.n_routed_experts, config.hidden_size), np.float64)
    counts = np.zeros(sums.shape[:2], np.int64)
    bar = tqdm(total=stream.size, desc="expert means", unit="tok", unit_scale=True, disable=not progress)
    with mesh_context(model.mesh), bar:
        for batch in stream:
            batch = jnp.asarray(batch) if model.mesh is None else to_mesh(batch, batch_sharding(model.mesh, 2))
            batch_sums, batch_counts = steps.expert_sums(model.graphdef, model.state, batch, execution=execution)
            sums += np.asarray(batch_sums, np.float64)
            counts += np.asarray(batch_counts, np.int64)
            bar.update(batch.size)
    means = sums / np.maximum(counts, 1)[..., None]
    return Calibration(means.astype(np.float32), counts, int(stream.size))
