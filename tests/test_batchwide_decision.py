"""Rules that rank pairs across the batch (CAEE, `capacity`) on a batch split over devices: the decision
of the whole batch (as with replicated attention), made after one all-gather per MoE layer, or with
`decision_scope="shard"` each device's decision on its own tokens, with no collective."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_caee_policy import DEVICE, FIT
from test_data_parallel_attention import mesh_of

import caee_jax
from caee_jax.caee.cost_table import CostTable, block_placement
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.caee.pruning import decide
from caee_jax.calibration.tables import signature_of
from caee_jax.model.execution import Execution
from caee_jax.parallel.placement import batch_sharding, mesh_context, to_mesh
from caee_jax.parallel.rowwise import batchwide

TOKENS = np.random.default_rng(1).integers(0, 131, (8, 5)).astype(np.int32)
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")


def two_device_table(config) -> CostTable:
    """Expert shard 1 twice as dear per pair as shard 0: CAEE's straggler target has a side to prefer."""
    signature = signature_of(config, None, jnp.float32, "loop")
    devices = (DEVICE, dataclasses.replace(DEVICE, pair_s=2 * DEVICE.pair_s))
    return CostTable(signature, devices, block_placement(config.n_routed_experts, 2), FIT)


def rules(config):
    return {
        "caee": Execution(pruning=CAEEConfig(theta=1.0), cost_table=two_device_table(config)),
        "capacity": Execution(pruning=PeerRule("capacity", 1.0)),
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "execution"))
def forward(graphdef, state, tokens, execution):
    """Logits [B, T, V] and keep masks of TOKENS's full pass."""
    out = nnx.merge(graphdef, state)(tokens, execution=execution)
    return out.logits, out.routing.keep_mask


def run(model, execution, compiled_text: bool = False):
    """forward's outputs on the model's mesh (the tokens split as its rules split the batch), or the text
    of its compiled program."""
    with mesh_context(model.mesh):
        tokens = to_mesh(TOKENS, batch_sharding(model.mesh, TOKENS.ndim))
        if compiled_text:
            return forward.lower(model.graphdef, model.state, tokens, execution).compile().as_text()
        return tuple(np.asarray(a) for a in forward(model.graphdef, model.state, tokens, execution))


@pytest.mark.parametrize("spec", ["data_expert=2", "data=2,data_expert=2"])
@pytest.mark.parametrize("rule", ["caee", "capacity"])
def test_a_split_batch_makes_the_whole_batch_decision(spec, rule):
    """Keep masks and logits on a split batch equal those of `expert=2` (replicated attention, the same
    two expert shards), which decides on the whole batch."""
    config = caee_jax.init_random("tiny", seed=5).config
    execution = rules(config)[rule]
    (want, want_keep), (got, got_keep) = (
        run(caee_jax.init_random("tiny", seed=5, mesh=mesh_of(s), execution=execution), execution)
        for s in ("expert=2", spec)
    )
    assert 0 < (~want_keep).sum() < want_keep.size  # the rule pruned some pairs, not all: the comparison can fail
    np.testing.assert_array_equal(got_keep, want_keep)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def collectives(model, execution) -> dict[str, int]:
    """Collective ops in the compiled full pass of TOKENS, by kind."""
    text = run(model, execution, compiled_text=True)
    return {kind: len(re.findall(rf"= [^=\n]*\b{kind}(?:-start)?\(", text)) for kind in COLLECTIVES}


def test_the_decision_costs_one_all_gather_per_moe_layer():
    """Before, XLA partitioned CAEE's sorts, cumsums and scatters along the split batch itself: many
    collectives per layer, +50-65% decode step on 2 processes."""
    mesh = mesh_of("data_expert=2")
    plain = caee_jax.init_random("tiny", seed=5, mesh=mesh)
    execution = rules(plain.config)["caee"]
    pruned = caee_jax.init_random("tiny", seed=5, mesh=mesh, execution=execution)
    base, with_caee = collectives(plain, Execution()), collectives(pruned, execution)
    assert base["all-to-all"] > 0  # the pattern finds collectives at all
    extra = {kind: with_caee[kind] - base[kind] for kind in COLLECTIVES}
    # The MoE layers run as one scanned loop: one all-gather in its body, once per layer.
    assert extra == {**dict.fromkeys(COLLECTIVES, 0), "all-gather": 1}, (base, with_caee)


def test_shard_scope_decides_on_each_devices_tokens_without_a_collective():
    """The first MoE layer's keep mask on data_expert=2 with decision_scope="shard" is CAEE's decision on
    each half of the batch alone (its routing does not depend on earlier pruning); no collective is added."""
    mesh = mesh_of("data_expert=2")
    plain = caee_jax.init_random("tiny", seed=5, mesh=mesh)
    whole_batch = rules(plain.config)["caee"]
    execution = dataclasses.replace(whole_batch, decision_scope="shard")
    model = caee_jax.init_random("tiny", seed=5, mesh=mesh, execution=execution)
    routing = nnx.merge(model.graphdef, model.state)(jnp.asarray(TOKENS), execution=Execution()).routing
    ids, weights = (np.asarray(a)[0] for a in (routing.topk_ids, routing.topk_weights))  # layer 0: [B, T, K]
    k, experts = ids.shape[-1], plain.config.n_routed_experts
    halves = (slice(0, len(TOKENS) // 2), slice(len(TOKENS) // 2, None))
    routed = [(jnp.asarray(ids[rows].reshape(-1, k)), jnp.asarray(weights[rows].reshape(-1, k))) for rows in halves]
    rule, table = execution.pruning, execution.cost_table
    want = np.stack([np.asarray(decide(rule, table, *half, experts, 2).keep_mask) for half in routed])
    keep = run(model, execution)[1][0]
    np.testing.assert_array_equal(keep.reshape(2, -1, k), want)
    whole = run(caee_jax.init_random("tiny", seed=5, mesh=mesh, execution=whole_batch), whole_batch)[1][0]
    assert (whole != keep).any()  # the two scopes decide differently here: the comparison can fail
    assert collectives(model, execution) == collectives(plain, Execution())


def test_batchwide_gathers_rows_of_every_dtype_and_keeps_each_devices_rows():
    mesh = mesh_of("data=2,data_expert=2")
    ids = jnp.arange(24, dtype=jnp.int32).reshape(8, 3)
    weights = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32).reshape(8, 2)
    flags = jnp.arange(8) % 3 == 0

    def whole_batch(ids, weights, flags, offset):  # every row depends on all rows before it
        return jnp.cumsum(ids, axis=0) + offset, jnp.cumsum(weights * flags[:, None], axis=0)

    want = whole_batch(ids, weights, flags, 7)
    with mesh_context(mesh):
        got = jax.jit(lambda *a: batchwide(whole_batch, a[:3], a[3:]))(ids, weights, flags, jnp.int32(7))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(TypeError, match="int32, float32 or bool rows, got bfloat16"), mesh_context(mesh):
        jax.jit(lambda w: batchwide(lambda x: x, (w,)))(weights.astype(jnp.bfloat16))
