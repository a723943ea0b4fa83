"""Redundant expert replicas in the runtime (`parallel/replicas.py`): a model placed with an EPLB placement
gives the unplaced model's logits and greedy ids on one device and expert-parallel, its pairs run on the
replica `Placement.route` names, CAEE counts loads by the slot's device, and bad placements are refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import caee_jax
from caee_jax.caee.cost_model import predict
from caee_jax.caee.cost_table import CostTable, CostTableError, DeviceCosts, FitQuality, block_placement
from caee_jax.caee.policy import CAEEConfig, explain
from caee_jax.calibration.tables import signature_of
from caee_jax.eval.decode_eval import compare
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.model.cache import LatentCache
from caee_jax.model.execution import Execution
from caee_jax.model.transformer import _is_routed_expert
from caee_jax.offload.cache import Offload
from caee_jax.parallel import eplb
from caee_jax.parallel.mesh import make_mesh
from caee_jax.parallel.placement import mesh_context, place_state
from caee_jax.parallel.replicas import PlacementError, to_slots
from caee_jax.runtime import steps
from caee_jax.weights.hf_export import hf_tensors

ATOL = 1e-5
SEED = 5
CONFIG = caee_jax.preset("tiny")
LAYERS, EXPERTS = CONFIG.num_moe_layers, CONFIG.n_routed_experts
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 9)).astype(np.int32)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [2]]
FIT = FitQuality(samples=1, r2=1.0, mape=0.0, median_abs_residual_s=0.0, max_abs_residual_s=0.0)
DEVICE = DeviceCosts(fixed_s=1e-4, pair_s=1e-5, activation_s=1e-3, fetch_s=(0.0, 0.0, 0.0), comm_token_s=0.0)


def mesh_of(spec: str | None):
    if spec is None:
        return None
    size = int(np.prod([int(part.split("=")[1]) for part in spec.split(",")]))
    return make_mesh(spec, jax.devices()[:size])


def placement_for(shards: int, extra: int = 2) -> eplb.Placement:
    """Balanced from skewed loads into E + extra x S slots (a few hot experts replicated)."""
    loads = np.random.default_rng(shards).zipf(1.5, (LAYERS, EXPERTS)).astype(np.float64)
    placement = eplb.balance(loads, EXPERTS + extra * shards, shards, num_groups=CONFIG.n_group)
    assert placement.replica_count.max() > 1
    return placement


def shards_of(spec: str | None) -> int:
    return 1 if spec is None else int(spec.split("=")[-1])


@pytest.fixture(scope="module")
def unplaced():
    """The unplaced model's logits [B, T, V] and greedy ids on one device."""
    model = caee_jax.init_random("tiny", seed=SEED)
    return np.asarray(model(TOKENS)), caee_jax.generate(model, PROMPTS, max_new_tokens=4, stop=[])


@pytest.mark.parametrize(
    ("spec", "dispatch"),
    [
        (None, "auto"),
        ("expert=2", "gather"),
        ("data_expert=2", "all_to_all"),
        ("data_expert=4", "gather"),  # with the next test's cases: both dispatches on both layouts
    ],
)
def test_logits_and_greedy_ids_equal_the_unplaced_model(unplaced, spec, dispatch):
    want_logits, want_ids = unplaced
    placement = placement_for(shards_of(spec))
    model = caee_jax.init_random(
        "tiny", seed=SEED, mesh=mesh_of(spec), placement=placement, execution=Execution(dispatch=dispatch)
    )
    gate = dict(nnx.to_flat_state(model.state))[("moe_layers", "ffn", "gate_proj")].get_value()
    assert gate.shape[1] == placement.num_slots
    if spec is not None:  # P / S slots on each expert shard
        assert {shard.data.shape[1] for shard in gate.addressable_shards} == {placement.num_slots // shards_of(spec)}
    np.testing.assert_allclose(np.asarray(model(TOKENS)), want_logits, atol=ATOL, rtol=0)
    assert caee_jax.generate(model, PROMPTS, max_new_tokens=4, stop=[]) == want_ids


def speed_aware_placement(shards: int) -> eplb.Placement:
    """Balanced for a last shard 3x slower: it routes fewer of its slots, the rest are spares."""
    loads = np.random.default_rng(shards).zipf(1.5, (LAYERS, EXPERTS)).astype(np.float64)
    cost = np.ones(shards)
    cost[-1] = 3.0
    placement = eplb.balance(loads, 2 * EXPERTS, shards, num_groups=CONFIG.n_group, device_cost=cost)
    assert not placement.slot_routed.all()
    return placement


def test_a_speed_aware_placement_with_spares_equals_the_unplaced_model(unplaced):
    want_logits, want_ids = unplaced
    model = caee_jax.init_random("tiny", seed=SEED, mesh=mesh_of("expert=2"), placement=speed_aware_placement(2))
    np.testing.assert_allclose(np.asarray(model(TOKENS)), want_logits, atol=ATOL, rtol=0)
    assert caee_jax.generate(model, PROMPTS, max_new_tokens=4, stop=[]) == want_ids


@pytest.mark.parametrize("placed", [placement_for, speed_aware_placement])
def test_to_slots_is_the_placements_rule(placed):
    placement = placed(2)
    ids = np.random.default_rng(1).integers(0, EXPERTS, (37, 4)).astype(np.int32)
    for layer in range(LAYERS):
        slots = placement.expert_slots()[layer]
        got = to_slots(jnp.asarray(ids), jnp.asarray(np.where(slots < 0, 0, slots)), placement.routed_count[layer])
        np.testing.assert_array_equal(np.asarray(got), placement.route(layer, ids))


def scaled_replicas(model, placement: eplb.Placement) -> np.ndarray:
    """Multiplies slot p's down projection by 1 + its replica rank (rank 0 unchanged; a pair run on another
    replica of its expert than the rule's changes the output); returns the factors [L, P]."""
    factors = 1.0 + placement.replica_rank.astype(np.float32)
    flat = dict(nnx.to_flat_state(model.state))
    down = flat[("moe_layers", "ffn", "down_proj")]
    down.set_value(down.get_value() * jnp.asarray(factors)[:, :, None, None])
    if model.mesh is not None:
        model.state = place_state(model.state, model.mesh)
    return factors


def moe_layer(model, layer: int):
    """MoE layer `layer` of the model's stack: its own parameters and the whole routed-expert stack, as the
    decoder's scan runs it."""
    layers = nnx.merge(model.graphdef, model.state).moe_layers
    graphdef, experts, state = nnx.split(layers, _is_routed_expert, ...)
    return nnx.merge(graphdef, experts, jax.tree.map(lambda a: a[layer], state)).ffn


@pytest.mark.parametrize(
    ("spec", "dispatch"), [(None, "auto"), ("expert=2", "all_to_all"), ("data_expert=4", "gather")]
)
def test_each_pair_runs_on_the_replica_the_rule_names(spec, dispatch):
    """With each replica's output scaled by 1 + its rank, every MoE layer's output equals the logical
    experts' outputs scaled by the factor of the slot `Placement.route` names for each pair; the routing
    reports those slots, and every replica gets pairs (placed from this input's own expert loads)."""
    execution = Execution(ExpertBackend.LOOP, dispatch=dispatch)
    plain = caee_jax.init_random("tiny", seed=SEED)
    x = jax.random.normal(jax.random.key(0), (8, 5, CONFIG.hidden_size), jnp.float32)
    routed = [moe_layer(plain, layer)(x, execution, jnp.int32(layer))[1].topk_ids for layer in range(LAYERS)]
    loads = np.stack([np.bincount(np.asarray(ids).reshape(-1), minlength=EXPERTS) for ids in routed])
    shards = shards_of(spec)
    placement = eplb.balance(loads, EXPERTS + 3 * shards, shards, num_groups=CONFIG.n_group)
    model = caee_jax.init_random("tiny", seed=SEED, mesh=mesh_of(spec), placement=placement, execution=execution)
    factors = scaled_replicas(model, placement)
    logical = plain.module.moe_layers.ffn.expert_weights
    run = nnx.jit(lambda ffn, x, layer: ffn(x, execution, layer))
    for layer in range(LAYERS):
        with mesh_context(model.mesh):
            y, routing = run(moe_layer(model, layer), x, jnp.int32(layer))
        ids = np.asarray(routing.topk_ids).reshape(-1, CONFIG.num_experts_per_tok)
        slots = placement.route(layer, ids)
        np.testing.assert_array_equal(np.asarray(routing.slot_ids).reshape(slots.shape), slots)
        assert (np.bincount(slots.reshape(-1), minlength=placement.num_slots) > 0).all()
        assert placement.replica_count[layer].max() > 1
        weights = np.asarray(routing.topk_weights).reshape(ids.shape) * factors[layer][slots]
        flat = x.reshape(-1, CONFIG.hidden_size)
        layer_weights = ExpertWeights(*(w[layer] for w in logical))
        keep = jnp.ones(ids.shape, bool)
        want = run_experts(flat, jnp.asarray(ids), jnp.asarray(weights), keep, layer_weights, ExpertBackend.DENSE)
        shared = moe_layer(plain, layer).shared(x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(want.reshape(x.shape) + shared), atol=ATOL, rtol=0)


def table_for(model, mesh) -> CostTable:
    signature = signature_of(model.config, mesh, jnp.float32, "loop")
    shards = shards_of(None if mesh is None else "x=" + str(mesh.shape["expert"]))
    return CostTable(signature, (DEVICE,) * shards, block_placement(EXPERTS, shards), FIT)


def test_caee_counts_loads_by_the_slots_device():
    """On expert=2, a placed model's CAEE decisions are the policy's on the physical slots, with each slot's
    device and its expert's calibrated importance: loads counted by slot device, which differ from the
    logical experts' devices."""
    mesh = mesh_of("expert=2")
    placement = placement_for(2)
    plain = caee_jax.init_random("tiny", seed=SEED)
    table = table_for(plain, mesh)
    rule = CAEEConfig(theta=2.0, expert_importance=True)
    execution = Execution(pruning=rule, cost_table=table)
    model = caee_jax.init_random("tiny", seed=SEED, mesh=mesh, placement=placement, execution=execution)
    expert_scale = np.random.default_rng(2).uniform(0.5, 2.0, (LAYERS, EXPERTS)).astype(np.float32)
    model.set_importance(expert_scale, np.ones(LAYERS, np.float32))
    with mesh_context(mesh):
        out = model.module(jnp.asarray(TOKENS), execution=execution)
    routing = jax.tree.map(np.asarray, out.routing)
    k = CONFIG.num_experts_per_tok
    physical = table.over_slots(placement.num_slots)
    moved = False
    for layer in range(LAYERS):
        ids, slots = routing.topk_ids[layer].reshape(-1, k), routing.slot_ids[layer].reshape(-1, k)
        weights = jnp.asarray(routing.topk_weights[layer].reshape(-1, k))
        slot_scale = jnp.asarray(expert_scale[layer][placement.slot_expert[layer]])
        want = explain(physical, rule, jnp.asarray(slots), weights, importance_scale=slot_scale)
        np.testing.assert_array_equal(routing.keep_mask[layer].reshape(-1, k), np.asarray(want.keep))
        np.testing.assert_array_equal(np.asarray(want.device), placement.slot_device[slots])
        logical = explain(table, rule, jnp.asarray(ids), weights, importance_scale=jnp.asarray(expert_scale[layer]))
        moved |= not np.allclose(np.asarray(want.device_s), np.asarray(logical.device_s))
    assert moved  # the physical loads differ from the logical ones: the comparison can fail
    assert (~routing.keep_mask).any()


def test_the_eval_steps_predicted_times_price_slots():
    """`steps.teacher_forced_step` on a placed model (expert=2) predicts each layer's device times from the
    slots and their devices (`CostTable.over_slots`), not from the logical experts."""
    mesh = mesh_of("expert=2")
    placement = placement_for(2)
    table = table_for(caee_jax.init_random("tiny", seed=SEED), mesh)
    execution = Execution(pruning=CAEEConfig(theta=2.0), cost_table=table)
    model = caee_jax.init_random("tiny", seed=SEED, mesh=mesh, placement=placement, execution=execution)
    tokens, positions = jnp.asarray(TOKENS[:, 0]), jnp.zeros(len(TOKENS), jnp.int32)
    with mesh_context(mesh):
        cache = LatentCache.zeros(CONFIG, len(TOKENS), 4)
        routing = model.module(tokens[:, None], positions[:, None], cache, execution=execution).routing
        predicted = steps.teacher_forced_step(
            model.graphdef, model.state, cache, tokens, positions, execution=execution, table=table
        )[3]  # donates the cache: last
    k = CONFIG.num_experts_per_tok
    physical, differs = table.over_slots(placement.num_slots), False
    for layer in range(LAYERS):
        slots, ids = np.asarray(routing.slot_ids[layer]).reshape(-1, k), np.asarray(routing.topk_ids[layer])
        keep = np.asarray(routing.keep_mask[layer]).reshape(-1, k)
        for side, mask in enumerate((np.ones_like(keep), keep)):
            want = predict(physical, jnp.asarray(slots), jnp.asarray(mask)).device_s
            np.testing.assert_allclose(np.asarray(predicted[side, layer]), np.asarray(want), rtol=1e-6)
        logical = predict(table, jnp.asarray(ids.reshape(-1, k)), jnp.ones(keep.shape, bool)).device_s
        differs |= not np.allclose(np.asarray(logical), np.asarray(predicted[0, layer]))
    assert differs


def test_eval_compares_a_placed_candidate_with_the_unplaced_model():
    """`decode_eval.compare` with a placed candidate model (expert=2): EPLB alone predicts the same tokens
    (nll within 1e-5, full agreement) and prices its MoE layers on the slots' devices, not the baseline's;
    EPLB with CAEE prunes."""
    mesh = mesh_of("expert=2")
    plain = caee_jax.init_random("tiny", seed=SEED, mesh=mesh)
    placed = caee_jax.init_random("tiny", seed=SEED, mesh=mesh, placement=placement_for(2))
    table = table_for(plain, mesh)
    windows = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (4, 8)).astype(np.int32)
    alone = compare(plain, Execution(), windows, prefix=5, table=table, candidate_model=placed)
    np.testing.assert_allclose(np.concatenate(alone.nll), np.concatenate(alone.nll_base), atol=ATOL, rtol=0)
    summary = alone.summary()
    assert summary["agreement"] == 1.0 and summary["pruned_pair_fraction"] == 0.0
    assert not np.allclose(summary["predicted_device_s"], summary["predicted_device_unpruned_s"])
    caee = Execution(pruning=CAEEConfig(theta=2.0), cost_table=table)
    both = compare(plain, caee, windows, prefix=5, table=table, candidate_model=placed).summary()
    assert both["pruned_pair_fraction"] > 0
    assert both["predicted_device_unpruned_s"] == summary["predicted_device_unpruned_s"]


def test_expert_sums_stay_logical():
    """The `mean` compensation calibration's per-expert output sums of a placed model are the unplaced
    model's: pairs run on their slots, summed by logical expert."""
    sums = []
    for placement in (None, placement_for(1, extra=3)):
        model = caee_jax.init_random("tiny", seed=SEED, placement=placement)
        out = model.module(jnp.asarray(TOKENS), collect_expert_sums=True)
        sums.append((np.asarray(out.routing.expert_sums), np.asarray(out.routing.expert_sq_norms)))
    for got, want in zip(sums[1], sums[0], strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_cost_table_over_slots():
    table = table_for(caee_jax.init_random("tiny", seed=SEED), mesh_of("expert=2"))
    assert table.over_slots(20).placement == (0,) * 10 + (1,) * 10
    with pytest.raises(CostTableError, match="21 experts do not divide 2 devices"):
        table.over_slots(21)
    scrambled = dataclasses.replace(table, placement=(1, 0) * 8)
    with pytest.raises(CostTableError, match="not the contiguous block placement"):
        scrambled.over_slots(20)


@pytest.mark.parametrize(
    ("spec", "placement", "error"),
    [
        ("expert=2", eplb.Placement(np.tile(np.arange(17), (LAYERS, 1)), np.zeros((LAYERS, 17), int), 17, 2),
         "num_experts is 17; this model and mesh have 16 routed experts"),
        ("expert=2", eplb.contiguous(LAYERS + 1, EXPERTS, 2), "layers is 3; this model and mesh have 2 MoE layers"),
        ("expert=4", placement_for(2), "num_devices is 2; this model and mesh have 4 expert shards"),
        (None, dataclasses.replace(placement_for(1, extra=3), num_devices=1), None),
    ],
)  # fmt: skip
def test_bad_placements_are_refused(spec, placement, error):
    if error is None:  # sanity: the last case is a good placement
        caee_jax.init_random("tiny", seed=SEED, mesh=mesh_of(spec), placement=placement)
        return
    with pytest.raises(PlacementError, match=error):
        caee_jax.init_random("tiny", seed=SEED, mesh=mesh_of(spec), placement=placement)


def test_slots_not_a_multiple_of_the_expert_shards_are_refused():
    slots = np.concatenate([np.tile(np.arange(EXPERTS), (LAYERS, 1)), np.zeros((LAYERS, 1), int)], 1)  # 17 slots
    ranks = np.concatenate([np.zeros((LAYERS, EXPERTS), int), np.ones((LAYERS, 1), int)], 1)
    placement = eplb.Placement(slots, ranks, EXPERTS, 2)
    with pytest.raises(PlacementError, match="17 slots are not a multiple of the 2 expert shards"):
        caee_jax.init_random("tiny", seed=SEED, mesh=mesh_of("expert=2"), placement=placement)
    broken = eplb.Placement(slots, np.zeros_like(ranks), EXPERTS, 1)
    with pytest.raises(PlacementError, match="replica_rank must number"):
        caee_jax.init_random("tiny", seed=SEED, placement=broken)


def test_fp8_experts_are_placed_with_their_scales():
    """fp8-stored experts: the block scales are gathered with their slots (the unplaced fp8 model's logits)."""
    tokens = TOKENS[:2]
    want = caee_jax.init_random("tiny", seed=SEED, weights="fp8")(tokens)
    placed = caee_jax.init_random("tiny", seed=SEED, weights="fp8", placement=placement_for(1, extra=3))
    assert dict(nnx.to_flat_state(placed.state))[("moe_layers", "ffn", "gate_scale")].get_value().shape[1] == 19
    np.testing.assert_allclose(np.asarray(placed(tokens)), np.asarray(want), atol=ATOL, rtol=0)


def test_placing_again_and_unplacing_recover_the_logical_experts():
    module = caee_jax.init_random("tiny", seed=SEED).module
    flat = dict(nnx.to_flat_state(nnx.state(module)))
    want = {name: flat[("moe_layers", "ffn", name)].get_value() for name in ("gate_proj", "up_proj", "down_proj")}
    module.set_placement(placement_for(1, extra=3))
    with pytest.raises(ValueError, match="export it after set_placement"):
        hf_tensors(module)
    module.set_placement(placement_for(1, extra=5))
    assert module.moe_layers.ffn.num_slots == EXPERTS + 5
    module.set_placement(None)
    assert module.moe_layers.ffn.expert_slots is None
    flat = dict(nnx.to_flat_state(nnx.state(module)))
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(flat[("moe_layers", "ffn", name)].get_value()), np.asarray(value))


def test_a_placement_and_offload_are_refused_together():
    with pytest.raises(ValueError, match="placement or offload, not both"):
        caee_jax.init_random("tiny", seed=SEED, placement=placement_for(1), offload=Offload("host"))
