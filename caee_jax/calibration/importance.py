"""Measuring CAEE's calibrated importance on calibration text: per-expert output norms, per-layer sensitivity.

One pass per batch of windows (`steps.importance_stats`): the unpruned model collects every routed expert's
squared output norm; then, for each MoE layer l, a probe prunes only layer l (PROBE: every token's lightest
slot; `Execution.prune_layers`) and the KL of its next-token distributions to the unpruned ones, and the
correct top-1 predictions it loses, are summed with the gate share it pruned. The file format and its
checked reading are in `caee/importance.py`.

Resumable: after each batch the sums so far are written to `resume_path` (atomically), with what they
were measured on; a rerun with the same model, text and sizes continues from there.
"""

from __future__ import annotations

import hashlib
import os

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from caee_jax.caee.importance import Calibration, SensitivityMeasure
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.calibration.expert_means import calibration_batches
from caee_jax.files import atomic_write
from caee_jax.model.execution import Execution
from caee_jax.parallel.placement import batch_sharding, mesh_context, to_mesh
from caee_jax.runtime import steps

PROBE = "topk"  # the probe prunes a layer down to K - 1 slots per token: its lightest slot goes


def probes(model) -> tuple[Execution, ...]:
    """One plan per MoE layer that prunes that layer alone (each token's lightest slot), unpruned elsewhere."""
    config = model.config
    rule = PeerRule(PROBE, config.num_experts_per_tok - 1)
    base = Execution(model.execution.backend, dispatch=model.execution.dispatch)
    return tuple(
        Execution(base.backend, base.dispatch, pruning=rule, prune_layers=(layer,))
        for layer in range(config.num_moe_layers)
    )


def calibrate(
    model,
    ids: np.ndarray,
    *,
    tokens: int,
    seq_len: int = 256,
    batch_size: int = 8,
    text_sha256: str = "",
    sensitivity_measure: str = SensitivityMeasure.KL,
    resume_path: str | None = None,
    progress: bool = True,
) -> Calibration:
    """CAEE's importance calibration of `model` (a `caee_jax.Model`) over the token stream ids [M].

    Windows of `seq_len` tokens, each its own sequence, `batch_size` per pass; at least `tokens` tokens in
    whole batches, as many as the stream holds. Sums accumulate in float64 in window order (deterministic).
    Both sensitivity rates are measured and stored; `sensitivity_measure` picks the one behind
    `layer_sensitivity`.
    """
    config = model.config
    stream = calibration_batches(model, ids, tokens, seq_len, batch_size)
    execution = Execution(model.execution.backend, dispatch=model.execution.dispatch)
    layers, experts = config.num_moe_layers, config.n_routed_experts
    identity = hashlib.sha256(stream.tobytes() + repr((config, str(model.dtype))).encode()).hexdigest()
    sums = dict(
        sq_norms=np.zeros((layers, experts)), counts=np.zeros((layers, experts), np.int64),
        kl=np.zeros(layers), share=np.zeros(layers), lost_correct=np.zeros(layers), done=np.zeros((), np.int64),
    )  # fmt: skip
    if resume_path and os.path.isfile(resume_path):
        with np.load(resume_path, allow_pickle=False) as saved:
            if str(saved["identity"]) == identity and set(sums) <= set(saved.files):
                sums = {name: saved[name] for name in sums}
    plans = probes(model)
    bar = tqdm(total=stream.size, desc="importance", unit="tok", unit_scale=True, disable=not progress)
    bar.update(int(sums["done"]) * batch_size * seq_len)
    with mesh_context(model.mesh), bar:
        for index in range(int(sums["done"]), len(stream)):
            batch = stream[index]
            batch = jnp.asarray(batch) if model.mesh is None else to_mesh(batch, batch_sharding(model.mesh, 2))
            out = steps.importance_stats(model.graphdef, model.state, batch, execution=execution, probes=plans)
            sq_norms, counts, kl, share, lost_correct = (np.asarray(a, np.float64) for a in out)
            sums["sq_norms"] = sums["sq_norms"] + sq_norms
            sums["counts"] = sums["counts"] + counts.astype(np.int64)
            sums["kl"], sums["share"] = sums["kl"] + kl, sums["share"] + share
            sums["lost_correct"] = sums["lost_correct"] + lost_correct
            sums["done"] = np.int64(index + 1)
            if resume_path:
                with atomic_write(resume_path, "wb") as f:
                    np.savez(f, identity=np.str_(identity), **sums)
            bar.update(batch.size)
    totals = (sums[name] for name in ("sq_norms", "counts", "kl", "share", "lost_correct"))
    return finish(*totals, int(stream.size), text_sha256, sensitivity_measure)


def finish(
    sq_norms,
    counts,
    kl,
    share,
    lost_correct,
    tokens: int,
    text_sha256: str,
    sensitivity_measure: str = SensitivityMeasure.KL,
) -> Calibration:
    """The calibration from its sums: sq_norms [L, E], counts [L, E], kl [L], share [L], lost_correct [L]
    (see module doc); the layer sensitivity from `sensitivity_measure`'s rate."""
    measure = SensitivityMeasure.parse(sensitivity_measure, "sensitivity_measure")
    rms = np.sqrt(sq_norms / np.maximum(counts, 1))  # [L, E]
    typical = (counts * rms).sum(-1) / np.maximum(counts.sum(-1), 1)  # [L]: mean over routed pairs
    scale = np.where(counts > 0, rms / np.maximum(typical[:, None], 1e-30), 1.0)
    kl_per_mass, top1_loss_per_mass = (np.asarray(a) / np.maximum(share, 1e-30) for a in (kl, lost_correct))
    rate = kl_per_mass if measure is SensitivityMeasure.KL else top1_loss_per_mass
    if not (rate > 0).all():
        unit = "nats of KL" if measure is SensitivityMeasure.KL else "correct top-1 predictions lost"
        raise ValueError(f"pruning a layer moved the output by {rate.tolist()} {unit} per unit of gate share")
    sensitivity = rate / rate.mean()
    return Calibration(
        scale.astype(np.float32), sensitivity.astype(np.float32), kl_per_mass.astype(np.float32),
        top1_loss_per_mass.astype(np.float32), measure, counts.astype(np.int64), tokens, text_sha256,
    )  # fmt: skip
