"""R1 decode at scale by simulation: real routing re-sampled to R1's shape, placed contiguously or by EPLB,
with and without CAEE, each MoE layer priced by the cost model (`caee/cost_model.predict`).

Routing (`r1_routing`): the bundled model's measured routing (32 experts, top-4, 4 groups) becomes R1's
(256 experts, top-8, 8 groups): small expert e stands for R1 experts 8e..8e+7 (so its group maps onto
two of R1's groups, and the small model's 2-of-4 group limit becomes R1's 4-of-8); each of a token's
4 slots becomes 2 distinct R1 experts of its block, drawn without replacement in proportion to a fixed
within-block popularity, and the slot's gate weight is split between them at a uniform random fraction.
The within-block popularities of a layer are 8 of that layer's 32 measured expert loads, drawn without
replacement: the skew inside a block is the skew measured across experts.

A step: `batch` tokens drawn from the evaluation half of the routing; EPLB plans from the loads of the
other half (its "history window"). Per MoE layer the methods are: contiguous blocks (no replicas), CAEE
on them, EPLB (each pair to a replica: `eplb.Placement.route`), and CAEE on EPLB's physical slots. The
layer time is the slowest device's predicted time. CAEE decides with the same table that prices it: a
perfect cost model, so its savings here are an upper bound. Letters: L layers, M tokens, K top-k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.caee.cost_model import predict
from caee_jax.caee.cost_table import CostTable
from caee_jax.caee.policy import CAEEConfig, caee_prune
from caee_jax.eval.r1_costs import R1_EXPERTS, R1_GROUPS, R1_TOP_K, DeviceModel, r1_table
from caee_jax.parallel import eplb

METHODS = ("contiguous", "caee", "eplb", "eplb+caee")
WITH_CAEE = {"contiguous": "caee", "eplb": "eplb+caee"}  # a placement -> the method pruning on it


def r1_routing(
    topk_ids: np.ndarray, topk_weights: np.ndarray, small_experts: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Measured routing [L, M, k] of a model with `small_experts` experts -> R1's [L, M, 8] ids and weights
    (see the module doc). Needs 256 / small_experts sub-experts per block and 8 / k draws per slot."""
    layers, tokens, top_k = topk_ids.shape
    block, draws = R1_EXPERTS // small_experts, R1_TOP_K // top_k
    rng = np.random.default_rng(seed)
    loads = np.stack([np.bincount(ids.reshape(-1), minlength=small_experts) for ids in topk_ids]) + 1.0  # [L, E]
    popularity = np.stack([[rng.choice(row, block, replace=False) for _ in range(small_experts)] for row in loads])
    # Gumbel top-k: `draws` sub-experts without replacement, in proportion to popularity [L, M, k, block].
    logits = np.log(popularity[np.arange(layers)[:, None, None], topk_ids])
    sub = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=-1)[..., :draws]
    ids = topk_ids[..., None] * block + sub  # [L, M, k, draws]
    split = rng.dirichlet(np.ones(draws), size=topk_ids.shape)  # [L, M, k, draws]
    weights = topk_weights[..., None] * split
    return ids.reshape(layers, tokens, R1_TOP_K), weights.reshape(layers, tokens, R1_TOP_K).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Result:
    """Means over MoE layers and steps: layer_s, the slowest device's time (s); imbalance, the slowest
    over the mean device time; pruned_pairs and pruned_mass, the shares of pairs and of gate weight CAEE
    pruned (0 without CAEE)."""

    device: str
    devices: int
    batch: int
    method: str
    layer_s: float
    imbalance: float
    pruned_pairs: float
    pruned_mass: float


def price(table: CostTable, ids: np.ndarray, weights: np.ndarray, caee: CAEEConfig | None) -> np.ndarray:
    """ids, weights [steps, N, K] (slots of `table`) -> per step: (layer s, mean device s, pruned pairs,
    pruned mass), [steps, 4]."""

    def one(step_ids, step_weights):
        keep = jnp.ones(step_ids.shape, bool)
        if caee is not None:
            keep = caee_prune(table, caee, step_ids, step_weights).keep_mask
        device_s = predict(table, step_ids, keep).device_s
        pruned_mass = jnp.where(keep, 0, step_weights).sum() / step_weights.sum()
        return jnp.stack([device_s.max(), device_s.mean(), 1 - keep.mean(), pruned_mass])

    return np.asarray(jax.vmap(one)(jnp.asarray(ids), jnp.asarray(weights)))


def simulate(
    ids: np.ndarray,
    weights: np.ndarray,
    device: DeviceModel,
    devices: int,
    batch: int,
    *,
    steps: int = 16,
    redundant: int = 32,
    devices_per_node: int = 8,
    caee: CAEEConfig | None = None,
    seed: int = 0,
) -> list[Result]:
    """R1 routing ids, weights [L, M, 8] -> one Result per method in METHODS.

    EPLB: at least `redundant` extra slots (rounded up to a multiple of `devices`), hierarchical over
    devices / devices_per_node nodes and R1's 8 groups (global when the nodes do not divide the groups).
    caee: the CAEE settings (None: the defaults).
    """
    caee = caee or CAEEConfig()
    layers, tokens, _ = ids.shape
    history, future = slice(0, tokens // 2), np.arange(tokens // 2, tokens)
    loads = np.stack([np.bincount(layer[history].reshape(-1), minlength=R1_EXPERTS) for layer in ids])
    slots = -(-(R1_EXPERTS + redundant) // devices) * devices
    nodes = max(1, devices // devices_per_node)
    placements = {
        "contiguous": eplb.contiguous(layers, R1_EXPERTS, devices),
        "eplb": eplb.balance(loads, slots, devices, num_groups=R1_GROUPS, num_nodes=nodes),
    }
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(future, batch, replace=False) for _ in range(steps)])  # [steps, batch]
    totals = {method: [] for method in METHODS}
    for layer in range(layers):
        step_ids, step_weights = ids[layer][picks], weights[layer][picks]  # [steps, batch, K]
        for name, placement in placements.items():
            table = r1_table(device, placement.slot_device, devices)
            slot_ids = np.stack([placement.route(layer, s) for s in step_ids])
            totals[name].append(price(table, slot_ids, step_weights, None))
            totals[WITH_CAEE[name]].append(price(table, slot_ids, step_weights, caee))
    results = []
    for method in METHODS:
        per_step = np.concatenate(totals[method])  # [layers * steps, 4]
        results.append(
            Result(
                device=device.name,
                devices=devices,
                batch=batch,
                method=method,
                layer_s=float(per_step[:, 0].mean()),
                imbalance=float((per_step[:, 0] / per_step[:, 1]).mean()),
                pruned_pairs=float(per_step[:, 2].mean()),
                pruned_mass=float(per_step[:, 3].mean()),
            )
        )
    return results
