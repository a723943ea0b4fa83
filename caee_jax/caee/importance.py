"""Calibrated importance for CAEE: a factor per routed expert and a sensitivity per MoE layer, known before
execution. The file, its checked reading, setting it into a model, and combining it into one factor.

CAEE's importance of a slot is its share of the token's gate mass (x K). Two calibrated refinements
(`CAEEConfig.expert_importance`, `.layer_sensitivity`), measured by `calibration/importance.py` on text
the evaluation never sees:

  expert_scale[l, e]       the RMS norm of expert e's unweighted output over the calibration tokens routed
                           to it, over the layer's RMS per routed pair: a pruned slot removes w * y_e from
                           the residual stream, so an expert with large outputs costs more to skip. Mean
                           over routed pairs 1; an expert never routed gets 1.
  layer_sensitivity[l]     how much the output moves per unit of pruned gate share when only layer l prunes
                           (each token's lightest slot), over its mean over the layers: pruning goes to the
                           layers where it hurts least. Measured (`sensitivity_measure`) as
  kl_per_mass[l]           "kl": KL(unpruned || pruned) of the next-token distribution (nats per unit of
                           gate share), or as
  top1_loss_per_mass[l]    "top1": the correct top-1 predictions lost (those the unpruned model got right
                           and the pruned one does not) per unit of gate share.

The file (.npz, written atomically) holds those, the string `sensitivity_measure`, `counts` [L, E] int64
(routed pairs per expert), int scalars `tokens`, `num_moe_layers`, `n_routed_experts`, `hidden_size`,
`num_experts_per_tok`, and `text_sha256` (the calibration text's hash: launch/eval.py refuses to evaluate
on it), `format`, `version`; reading checks them against the model and names the field at fault. Files
written before the top-1 measure lack `top1_loss_per_mass` and `sensitivity_measure` (their sensitivity
is "kl"); they read as before.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.caee import npz_fields
from caee_jax.caee.policy import CAEEConfig
from caee_jax.choice import Choice
from caee_jax.config import ModelConfig
from caee_jax.files import atomic_write

FORMAT = "caee-importance"
VERSION = 1
FILENAME = "importance.npz"  # its default place: next to the checkpoint (launch/eval.py, launch/run.py)
DIMS = ("num_moe_layers", "n_routed_experts", "hidden_size", "num_experts_per_tok")


class ImportanceError(ValueError):
    """An importance file that is missing, unreadable or made for another model."""


class SensitivityMeasure(Choice):
    """What a layer's sensitivity counts per unit of pruned gate share (module doc)."""

    KL = "kl"
    TOP1 = "top1"


class Calibration(NamedTuple):
    """expert_scale [L_moe, E] f32; layer_sensitivity [L_moe] f32, from `sensitivity_measure`'s rate;
    kl_per_mass [L_moe] f32 (nats); top1_loss_per_mass [L_moe] f32 (correct predictions lost; NaN in a file
    written before it was measured); counts [L_moe, E] int64: routed pairs per expert; tokens: calibration
    tokens; text_sha256: of the text."""

    expert_scale: np.ndarray
    layer_sensitivity: np.ndarray
    kl_per_mass: np.ndarray
    top1_loss_per_mass: np.ndarray
    sensitivity_measure: SensitivityMeasure
    counts: np.ndarray
    tokens: int
    text_sha256: str


def default_path(model_dir: str) -> str:
    return os.path.join(model_dir, FILENAME)


def uses_importance(rule) -> bool:
    """True for an enabled CAEE rule that scales importance by a calibrated factor."""
    return isinstance(rule, CAEEConfig) and rule.enabled and (rule.expert_importance or rule.layer_sensitivity)


def slot_scale(rule: CAEEConfig, expert_scale: jax.Array, sensitivity: jax.Array) -> jax.Array:
    """One layer's factor per expert [E] f32 for the options `rule` turns on: expert_scale [E] and/or the
    layer's sensitivity (a scalar)."""
    scale = expert_scale if rule.expert_importance else jnp.ones_like(expert_scale)
    return scale * sensitivity if rule.layer_sensitivity else scale


def save(path: str, result: Calibration, config: ModelConfig) -> None:
    """Writes the file atomically (`files.atomic_write`)."""
    fields = dict(format=np.str_(FORMAT), version=np.int64(VERSION), tokens=np.int64(result.tokens))
    fields |= {name: np.int64(getattr(config, name)) for name in DIMS}
    fields |= dict(
        expert_scale=np.asarray(result.expert_scale, np.float32),
        layer_sensitivity=np.asarray(result.layer_sensitivity, np.float32),
        kl_per_mass=np.asarray(result.kl_per_mass, np.float32),
        top1_loss_per_mass=np.asarray(result.top1_loss_per_mass, np.float32),
        sensitivity_measure=np.str_(result.sensitivity_measure),
        counts=np.asarray(result.counts, np.int64),
        text_sha256=np.str_(result.text_sha256),
    )
    with atomic_write(path, "wb") as f:
        np.savez(f, **fields)


def read(path: str, config: ModelConfig) -> Calibration:
    """The file at `path`, checked against `config`; ImportanceError names the file and the field at fault."""
    if not os.path.isfile(path):
        raise ImportanceError(f"{path}: no such importance file (make one with launch/calibrate_importance.py)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ImportanceError(f"{path}: not an importance .npz file ({error})") from error
    with archive:
        header = dict(format=FORMAT, version=VERSION, dims=DIMS, config=config)
        npz_fields.check_header(archive, path, ImportanceError, **header)
        field = functools.partial(npz_fields.field, archive, path, error=ImportanceError)
        integer = functools.partial(npz_fields.integer, archive, path, error=ImportanceError)
        tokens, text_sha256 = integer("tokens"), str(field("text_sha256"))
        arrays = {name: field(name) for name in ("expert_scale", "layer_sensitivity", "kl_per_mass", "counts")}
        layers, experts = config.num_moe_layers, config.n_routed_experts
        measured = "top1_loss_per_mass" in archive.files  # absent from files written before it was measured
        arrays["top1_loss_per_mass"] = field("top1_loss_per_mass") if measured else np.full(layers, np.nan, np.float32)
        measure = str(field("sensitivity_measure")) if measured else SensitivityMeasure.KL
    try:
        measure = SensitivityMeasure.parse(measure, "sensitivity_measure")
    except ValueError as error:
        raise ImportanceError(f"{path}: field {error}") from None
    shapes = dict(expert_scale=(layers, experts), layer_sensitivity=(layers,), kl_per_mass=(layers,))
    for name, shape in (shapes | dict(top1_loss_per_mass=(layers,))).items():
        value = arrays[name]
        if value.shape != shape or value.dtype != np.float32:
            raise ImportanceError(f"{path}: field {name!r} is {value.dtype} {value.shape}; expected float32 {shape}")
        if name in shapes and not (np.isfinite(value).all() and (value > 0).all()):
            raise ImportanceError(f"{path}: field {name!r} must hold finite values > 0")
    counts = arrays["counts"]
    if counts.shape != (layers, experts) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ImportanceError(f"{path}: field 'counts' must be non-negative integers of shape {(layers, experts)}")
    if (counts.sum(-1) != tokens * config.num_experts_per_tok).any():
        raise ImportanceError(f"{path}: field 'counts' sums to {counts.sum(-1).tolist()}; 'tokens' x top-k differs")
    return Calibration(
        arrays["expert_scale"], arrays["layer_sensitivity"], arrays["kl_per_mass"], arrays["top1_loss_per_mass"],
        measure, counts.astype(np.int64), tokens, text_sha256,
    )  # fmt: skip


def load_importance(model, path: str) -> Calibration:
    """Reads the file (checked against the model) and sets it into `model` (a `caee_jax.Model`)."""
    result = read(path, model.config)
    model.set_importance(result.expert_scale, result.layer_sensitivity)
    return result
