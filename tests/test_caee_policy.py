"""The CAEE policy's invariants on constructed routings, and compensation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_counter

from caee_jax.caee.compensation import compensate
from caee_jax.caee.cost_model import predict
from caee_jax.caee.cost_table import CostTable, DeviceCosts, FitQuality, block_placement
from caee_jax.caee.policy import CAEEConfig, _prune_in_score_order, caee_prune, explain
from caee_jax.calibration.tables import signature_of
from caee_jax.config import preset
from caee_jax.routing.ops import expert_load, weight_rank

FIT = FitQuality(samples=1, r2=1.0, mape=0.0, median_abs_residual_s=0.0, max_abs_residual_s=0.0)
DEVICE = DeviceCosts(fixed_s=1e-4, pair_s=1e-5, activation_s=1e-3, fetch_s=(0.0, 2e-3, 5e-2), comm_token_s=0.0)


def table(num_experts: int, num_devices: int, top_k: int, backend: str = "pallas") -> CostTable:
    """backend pallas: no row tiling, exact pair costs; loop: pairs computed in whole tiles."""
    signature = signature_of(preset("tiny"), None, jnp.float32, backend)
    signature = dataclasses.replace(signature, n_routed_experts=num_experts, num_experts_per_tok=top_k)
    placement = block_placement(num_experts, num_devices)
    return CostTable(signature, (DEVICE,) * num_devices, placement, FIT)


def loads(costs: CostTable, ids, keep=None) -> np.ndarray:
    """Predicted device times [S] (s) of running the kept pairs (every pair when keep is None)."""
    keep = jnp.ones(ids.shape, bool) if keep is None else keep
    return np.asarray(predict(costs, jnp.asarray(ids), keep).device_s)


def random_routing(seed: int, num_tokens: int, num_experts: int, top_k: int):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)]).astype(np.int32)
    weights = rng.dirichlet(np.ones(top_k), num_tokens).astype(np.float32) * 2.5
    return jnp.asarray(ids), jnp.asarray(weights)


def test_theta_zero_prunes_nothing_and_keeps_the_weights():
    ids, weights = random_routing(0, 16, 16, 4)
    costs = table(16, 2, 4)
    result = caee_prune(costs, CAEEConfig(theta=0.0), ids, weights)
    assert bool(result.keep_mask.all())
    np.testing.assert_array_equal(np.asarray(result.weights), np.asarray(weights))
    np.testing.assert_array_equal(loads(costs, ids, result.keep_mask), loads(costs, ids))


@pytest.mark.parametrize("k_min", [0, 1, 2, 3])
def test_the_top_k_min_slots_are_never_pruned(k_min):
    ids, weights = random_routing(1, 32, 16, 4)
    result = caee_prune(table(16, 1, 4), CAEEConfig(theta=1e9, k_min=k_min), ids, weights)
    rank = np.asarray(weight_rank(weights))
    keep = np.asarray(result.keep_mask)
    assert keep[rank < k_min].all()
    assert not keep[rank >= k_min].any()  # one device, huge theta: every other slot goes


def test_weight_rank():
    np.testing.assert_array_equal(np.asarray(weight_rank(jnp.array([[0.1, 0.5, 0.3, 0.1]]))), [[2, 0, 1, 3]])


def test_weight_rank_is_the_stable_sort_rank_with_ties():
    weights = jnp.asarray(np.random.default_rng(0).integers(0, 3, (200, 8)).astype(np.float32))
    by_sorting = jnp.argsort(jnp.argsort(-weights, axis=-1, stable=True), axis=-1, stable=True)
    np.testing.assert_array_equal(np.asarray(weight_rank(weights)), np.asarray(by_sorting))


@pytest.mark.parametrize("mode", ["none", "renorm", "partial", "mean"])
def test_compensation_moves_weight_only_to_kept_slots(mode):
    ids, weights = random_routing(2, 64, 16, 4)
    result = caee_prune(table(16, 1, 4), CAEEConfig(theta=1.0, compensation=mode), ids, weights)
    keep, out, w = (np.asarray(a) for a in (result.keep_mask, result.weights, weights))
    assert 0 < keep.sum() < keep.size
    assert (out[~keep] == 0).all()
    total, kept_mass, new_mass = w.sum(-1), (w * keep).sum(-1), out.sum(-1)
    if mode == "renorm":
        np.testing.assert_allclose(new_mass, total, rtol=1e-6)
    elif mode == "partial":
        assert (new_mass >= kept_mass - 1e-6).all() and (new_mass <= total + 1e-6).all()
        pruned = total > kept_mass + 1e-6
        assert (new_mass[pruned] < total[pruned]).all() and (new_mass[pruned] > kept_mass[pruned]).all()
    else:
        np.testing.assert_allclose(new_mass, kept_mass, rtol=1e-6)
    # Kept slots keep their relative proportions.
    ratio = np.where(keep, out / w, np.nan)
    assert np.allclose(np.nanmax(ratio, -1), np.nanmin(ratio, -1), rtol=1e-6)


def test_compensate_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="compensation 'all' is not one of"):
        compensate(jnp.ones((1, 2)), jnp.ones((1, 2), bool), "all")


def straggler_routing():
    """Top-2 routing of 14 tokens over 8 experts on 2 devices: 12 tokens on device 0 (experts 0-3), 2 on
    device 1 (experts 4-7)."""
    rng = np.random.default_rng(3)
    heavy = np.stack([rng.permutation(4)[:2] for _ in range(12)])
    light = np.stack([4 + rng.permutation(4)[:2] for _ in range(2)])
    ids = jnp.asarray(np.concatenate([heavy, light]).astype(np.int32))
    return ids, jnp.asarray(rng.dirichlet(np.ones(2), 14).astype(np.float32))


def test_only_the_heavy_device_is_pruned():
    """Device 0 (experts 0-3) gets 12 tokens, device 1 (experts 4-7) 2: only device 0 prunes, and only
    down to about the target (the mean load)."""
    ids, weights = straggler_routing()
    costs = table(8, 2, 2)
    result = caee_prune(costs, CAEEConfig(theta=1e9, k_min=1, target="mean"), ids, weights)
    keep = np.asarray(result.keep_mask)
    assert not keep[:12].all() and keep[12:].all()
    before, after = loads(costs, ids), loads(costs, ids, result.keep_mask)
    target = before.mean()
    assert after[1] == before[1] and after[0] < before[0]
    assert after[0] >= target - DEVICE.activation_s  # stops near the target (one slot's cost at most)


def test_the_floor_target_prunes_the_straggler_as_far_as_theta_allows():
    """Device 0 (12 tokens) is the straggler even with every candidate pruned: with theta that admits every
    non-top-1 slot, it keeps only its tokens' top-1 slots; device 1 (2 tokens) prunes nothing."""
    ids, weights = straggler_routing()
    costs = table(8, 2, 2)
    floor = caee_prune(costs, CAEEConfig(theta=1e9, target="floor"), ids, weights)
    keep = np.asarray(floor.keep_mask)
    np.testing.assert_array_equal(keep[:12], np.asarray(weight_rank(weights))[:12] == 0)
    assert keep[12:].all()
    mean = caee_prune(costs, CAEEConfig(theta=1e9, target="mean"), ids, weights)
    assert loads(costs, ids, floor.keep_mask).max() < loads(costs, ids, mean.keep_mask).max()


def test_next_heaviest_target_prunes_less_than_the_mean_target():
    ids, weights = random_routing(4, 32, 16, 4)
    costs = table(16, 4, 4)
    pruned = {
        target: int((~caee_prune(costs, CAEEConfig(theta=1e9, target=target), ids, weights).keep_mask).sum())
        for target in ("next", "mean")
    }
    assert 0 < pruned["next"] <= pruned["mean"]


def test_an_expert_used_by_one_token_goes_before_one_shared_by_many():
    """Same gate weights everywhere; expert 7 serves one token, expert 6 serves ten. Raising theta, the
    first slot to go is expert 7's."""
    ids = np.array([[0, 6]] * 10 + [[1, 7]], np.int32)
    weights = np.tile(np.array([[0.6, 0.4]], np.float32), (11, 1))
    costs = table(8, 1, 2)
    for theta in np.linspace(0.0, 3.0, 61):
        keep = np.asarray(caee_prune(costs, CAEEConfig(theta=float(theta)), jnp.asarray(ids), weights).keep_mask)
        if not keep.all():
            assert np.argwhere(~keep).tolist() == [[10, 1]], f"theta {theta}: first pruned {np.argwhere(~keep)}"
            return
    pytest.fail("nothing was pruned")


def test_refill_restores_only_slots_that_cost_nothing():
    """With whole-tile rows (loop backend, 8-row tiles here), a pruned slot whose expert still runs and has
    spare rows is restored: the predicted loads stay those of the unrefilled decision, fewer slots go,
    and every slot still pruned belongs to an expert with no spare rows (skipped, or tiles full)."""
    ids, weights = random_routing(6, 16, 16, 4)
    costs = table(16, 1, 4, backend="loop")
    plain = caee_prune(costs, CAEEConfig(theta=1.2, refill=False), ids, weights)
    refilled = caee_prune(costs, CAEEConfig(theta=1.2), ids, weights)
    np.testing.assert_array_equal(loads(costs, ids, refilled.keep_mask), loads(costs, ids, plain.keep_mask))
    keep, keep_plain = np.asarray(refilled.keep_mask), np.asarray(plain.keep_mask)
    assert (keep >= keep_plain).all() and keep.sum() > keep_plain.sum()
    kept_per_expert = np.bincount(np.asarray(ids)[keep], minlength=16)
    assert (kept_per_expert[np.asarray(ids)[~keep]] % 8 == 0).all()


def test_a_table_without_slot_costs_prunes_by_importance():
    free = DeviceCosts(fixed_s=1e-4, pair_s=0.0, activation_s=0.0, fetch_s=(0.0, 0.0, 0.0), comm_token_s=0.0)
    costs = dataclasses.replace(table(16, 1, 4), devices=(free,))
    ids, weights = random_routing(5, 16, 16, 4)
    keep = np.asarray(caee_prune(costs, CAEEConfig(theta=0.9), ids, weights).keep_mask)
    importance = 4 * np.asarray(weights) / np.asarray(weights).sum(-1, keepdims=True)
    rank = np.asarray(weight_rank(weights))
    np.testing.assert_array_equal(keep, (importance >= 0.9) | (rank < 1))


def test_cost_exponent_scales_how_much_the_cost_counts():
    """0: the decision of a table without slot costs (importance alone); 1: the default, bit for bit;
    between: the score is importance / cost ** exponent."""
    ids, weights = random_routing(5, 16, 16, 4)
    costs = table(16, 1, 4)
    free = dataclasses.replace(costs, devices=(dataclasses.replace(DEVICE, pair_s=0.0, activation_s=0.0),))
    keep = {
        e: np.asarray(caee_prune(costs, CAEEConfig(theta=0.9, cost_exponent=e), ids, weights).keep_mask)
        for e in (0.0, 0.5, 1.0)
    }
    np.testing.assert_array_equal(
        keep[0.0], np.asarray(caee_prune(free, CAEEConfig(theta=0.9), ids, weights).keep_mask)
    )
    np.testing.assert_array_equal(
        keep[1.0], np.asarray(caee_prune(costs, CAEEConfig(theta=0.9), ids, weights).keep_mask)
    )
    why = explain(costs, CAEEConfig(theta=0.9, cost_exponent=0.5), ids, weights)
    np.testing.assert_allclose(np.asarray(why.score), np.asarray(why.importance / np.sqrt(why.cost)), rtol=1e-6)
    assert not np.array_equal(keep[0.5], keep[1.0]) and not np.array_equal(keep[0.5], keep[0.0])


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_per_expert_scores_each_expert_by_its_users_summed_importance_over_their_summed_cost(exponent):
    ids, weights = random_routing(7, 16, 16, 4)
    costs = table(16, 1, 4)
    why = explain(costs, CAEEConfig(theta=1.0, cost_exponent=exponent, per_expert=True), ids, weights)
    flat_ids = np.asarray(ids).ravel()
    importance, cost = (np.bincount(flat_ids, np.asarray(a).ravel(), 16) for a in (why.importance, why.cost))
    expected = (importance / np.where(cost > 0, cost, 1) ** exponent)[flat_ids].reshape(ids.shape)
    np.testing.assert_allclose(np.asarray(why.score), expected, rtol=1e-5)


def test_a_table_priced_as_another_tier_decides_as_that_tier():
    """`CostTable.priced_as("host", "disk")`: a host miss costs what a disk miss does, so the decisions are the
    disk's (launch/eval.py --price-misses-as); at the host's own price they differ."""
    ids, weights = random_routing(3, 16, 16, 4)
    costs, config = table(16, 1, 4), CAEEConfig(theta=1.0)
    missing = np.random.default_rng(3).random(16) < 0.5
    on = {tier: jnp.asarray(np.where(missing, tier, 0), jnp.int32) for tier in (1, 2)}
    disk = np.asarray(caee_prune(costs, config, ids, weights, on[2]).keep_mask)
    priced = np.asarray(caee_prune(costs.priced_as("host", "disk"), config, ids, weights, on[1]).keep_mask)
    own = np.asarray(caee_prune(costs, config, ids, weights, on[1]).keep_mask)
    np.testing.assert_array_equal(priced, disk)
    assert (own != disk).any()


def test_per_expert_changes_nothing_when_every_expert_has_one_user():
    """Batch 1 (an offloaded decode step): a token's K slots are K experts, each with one user."""
    pruned_any = False
    for seed in range(4):
        ids, weights = random_routing(seed, 1, 16, 4)
        residency = jnp.asarray(np.random.default_rng(seed).integers(0, 3, 16), jnp.int32)
        decide = functools.partial(caee_prune, table(16, 1, 4), topk_ids=ids, topk_weights=weights, residency=residency)
        for theta in (0.6, 1.0, 1.6):
            plain = decide(CAEEConfig(theta=theta))
            whole = decide(CAEEConfig(theta=theta, per_expert=True))
            np.testing.assert_array_equal(np.asarray(whole.keep_mask), np.asarray(plain.keep_mask))
            pruned_any = pruned_any or not bool(plain.keep_mask.all())
    assert pruned_any


def test_per_expert_skips_the_expert_of_least_summed_importance_first():
    """Experts 6 and 7 serve two tokens each (second slots). Expert 6 has the lightest slot of all (token 0)
    but a heavy one too (token 1): the slot rule prunes token 0's slot first, which empties nothing;
    per_expert skips expert 7 first, both users at once (summed importance 1.0 against 1.05)."""
    ids = jnp.asarray(np.array([[0, 6], [1, 6], [2, 7], [3, 7]], np.int32))
    weights = jnp.asarray(np.array([[0.95, 0.05], [0.525, 0.475], [0.75, 0.25], [0.75, 0.25]], np.float32))
    costs = table(8, 1, 2)
    first = {}
    for per_expert in (False, True):
        for theta in np.linspace(0.0, 2.0, 201):
            keep = np.asarray(
                caee_prune(costs, CAEEConfig(theta=float(theta), per_expert=per_expert), ids, weights).keep_mask
            )
            if not keep.all():
                first[per_expert] = np.argwhere(~keep).tolist()
                break
    assert first == {False: [[0, 1]], True: [[2, 1], [3, 1]]}


def test_per_expert_empties_experts_whole_on_the_tiled_backend():
    """With whole-tile rows an expert is either skipped for all its users or runs for all of them (refill
    restores the rest)."""
    ids, weights = random_routing(8, 16, 16, 4)
    costs = table(16, 1, 4, backend="loop")
    keep = np.asarray(caee_prune(costs, CAEEConfig(theta=1.0, per_expert=True), ids, weights).keep_mask)
    flat_ids = np.asarray(ids).ravel()
    users, kept = np.bincount(flat_ids, minlength=16), np.bincount(flat_ids, keep.ravel(), 16)
    assert ((kept == 0) | (kept == users)).all()
    assert (users[kept == 0] > 0).any() and keep.any()


def test_stats_count_active_experts():
    ids = jnp.array([[0, 6]] * 10 + [[1, 7]], jnp.int32)
    weights = jnp.tile(jnp.array([[0.6, 0.4]]), (11, 1))
    result = caee_prune(table(8, 1, 2), CAEEConfig(theta=1e9), ids, weights)
    active_before, active_after = (int(expert_load(ids, keep, 8).active.sum()) for keep in (ids >= 0, result.keep_mask))
    assert (active_before, active_after) == (4, 2)


def test_new_routing_never_recompiles():
    costs = table(16, 2, 4)
    fn = jax.jit(functools.partial(caee_prune, costs, CAEEConfig(theta=1.0)))
    cases = [random_routing(seed, 8, 16, 4) for seed in range(5)]
    cases = [(np.asarray(i), np.asarray(w)) for i, w in cases]
    with compile_counter() as compiles:
        fn(*cases[0])
        first = len(compiles)
        for case in cases[1:]:
            fn(*case)
    assert len(compiles) == first


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("theta", -1.0, "theta must be a finite number >= 0"),
        ("target", "max", "target 'max'"),
        ("compensation", "x", "compensation"),
        ("cost_exponent", -0.5, "cost_exponent must be a finite number >= 0"),
    ],
)
def test_bad_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        CAEEConfig(**{field: value})


def slowed_table(slow: int) -> CostTable:
    """Two devices, 32 experts, top-4, loop backend; device `slow` 2x dearer in every cost."""
    devices = [DEVICE, DEVICE]
    devices[slow] = DeviceCosts(
        fixed_s=2e-4, pair_s=2e-5, activation_s=2e-3, fetch_s=(0.0, 4e-3, 1e-1), comm_token_s=0.0
    )
    return dataclasses.replace(table(32, 2, 4, "loop"), devices=tuple(devices))


@pytest.mark.parametrize("slow", [0, 1])
@pytest.mark.parametrize("target", ["floor", "next", "mean"])
def test_decisions_concentrate_on_a_slow_device(slow, target):
    """A calibrated straggler (`launch/calibrate.py --slow-process`): device `slow` is 2x dearer in every
    cost, the routing balanced (batch 16, 32 experts, top-4 as the bundled model). CAEE prunes there and
    nowhere else, with every target, whichever device it is: with equal devices, this routing is pruned
    on device 1 (slightly heavier), so slow=0 moves every decision away from where routing alone puts it."""
    ids, weights = random_routing(5, 16, 32, 4)
    config = CAEEConfig(theta=0.8, target=target)
    equal = explain(table(32, 2, 4, "loop"), config, ids, weights)
    assert (np.asarray(equal.device)[np.asarray(equal.pruned)] == 1).any()
    devices = [DEVICE, DEVICE]
    devices[slow] = DeviceCosts(
        fixed_s=2e-4, pair_s=2e-5, activation_s=2e-3, fetch_s=(0.0, 4e-3, 1e-1), comm_token_s=0.0
    )
    costs = dataclasses.replace(table(32, 2, 4, "loop"), devices=tuple(devices))
    decision = explain(costs, config, ids, weights)
    device = np.asarray(decision.device)
    assert np.asarray(decision.pruned).any() and (device[np.asarray(decision.pruned)] == slow).all()
    assert (device[~np.asarray(decision.keep)] == slow).all()
    assert loads(costs, ids, decision.keep)[slow] < loads(costs, ids)[slow]


def test_target_none_is_the_straggler_logic_off():
    """Target "none": every candidate on every device is pruned, the fast device's too."""
    ids, weights = random_routing(5, 16, 32, 4)
    decision = explain(slowed_table(1), CAEEConfig(theta=0.8, target="none"), ids, weights)
    pruned = np.asarray(decision.pruned)
    np.testing.assert_array_equal(pruned, np.asarray(decision.candidate))
    assert set(np.asarray(decision.device)[pruned]) == {0, 1}


@pytest.mark.parametrize("target", ["floor", "next", "mean", "none"])
def test_one_device_prunes_every_candidate_with_every_target(target):
    """On one device every target is the floor that device sets itself: the score-ordered pruning against
    it (`_prune_in_score_order` with an unbounded excess) takes every candidate, which is what runs."""
    ids, weights = random_routing(6, 16, 32, 4)
    costs = table(32, 1, 4, "loop")
    decision = explain(costs, CAEEConfig(theta=1.0, target=target, refill=False), ids, weights)
    sorted_path = _prune_in_score_order(
        1, decision.candidate, decision.device, decision.score, decision.cost_s, jnp.full(1, jnp.inf)
    )
    assert np.asarray(decision.candidate).any() and not np.asarray(decision.candidate).all()
    np.testing.assert_array_equal(np.asarray(decision.pruned), np.asarray(decision.candidate))
    np.testing.assert_array_equal(np.asarray(decision.pruned), np.asarray(sorted_path))
