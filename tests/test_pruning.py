"""Peer rules, and pruning inside the model: off is bit-identical, rules change what runs, meshes agree."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from test_caee_policy import DEVICE, FIT, random_routing
from test_expert_parallel import mesh_of

import caee_jax
from caee_jax.caee.cost_table import CostTable, block_placement
from caee_jax.caee.peer_rules import PeerRule, peer_keep_mask
from caee_jax.caee.policy import CAEEConfig, Target
from caee_jax.calibration.tables import signature_of
from caee_jax.model.execution import Execution
from caee_jax.routing.ops import weight_rank
from caee_jax.runtime.generate import generate_with_stats

TOKENS = np.random.default_rng(0).integers(0, 211, (4, 9)).astype(np.int32)


def keep_of(name, knob, k_min=1, seed=0, tokens=16, experts=16, top_k=4):
    ids, weights = random_routing(seed, tokens, experts, top_k)
    keep = peer_keep_mask(PeerRule(name, knob, k_min), ids, weights, experts)
    return np.asarray(ids), np.asarray(weights), np.asarray(keep)


def test_static_topk_keeps_the_heaviest():
    _, w, keep = keep_of("topk", 2)
    assert (keep.sum(-1) == 2).all()
    assert keep[np.asarray(weight_rank(jnp.asarray(w))) < 2].all()


def test_ratio_and_mass_thresholds():
    _, w, keep = keep_of("top1_ratio", 0.5, k_min=0)
    np.testing.assert_array_equal(keep, w >= 0.5 * w.max(-1, keepdims=True))
    _, w, keep = keep_of("mass_ratio", 0.2, k_min=0)
    np.testing.assert_array_equal(keep, w >= 0.2 * w.sum(-1, keepdims=True))


def test_top_p_keeps_the_smallest_heaviest_prefix_reaching_p():
    _, w, keep = keep_of("top_p", 0.7, k_min=0)
    for row_w, row_keep in zip(w, keep, strict=True):
        order = np.argsort(-row_w)
        share = np.cumsum(row_w[order]) / row_w.sum()
        want = np.zeros_like(row_keep)
        want[order[: int(np.searchsorted(share, 0.7 - 1e-7)) + 1]] = True
        np.testing.assert_array_equal(row_keep, want)


def test_capacity_keeps_each_experts_heaviest_pairs():
    ids, w, keep = keep_of("capacity", 0.5, k_min=0, tokens=32)  # capacity ceil(0.5 * 32*4/16) = 4
    for expert in range(16):
        pairs = w[ids == expert]
        kept = w[(ids == expert) & keep]
        assert len(kept) == min(4, len(pairs))
        assert np.allclose(np.sort(kept), np.sort(pairs)[len(pairs) - len(kept) :])


def test_k_min_protects_every_peer_rule():
    for name, knob in [("topk", 0), ("top1_ratio", 2.0), ("mass_ratio", 2.0), ("top_p", 0.0), ("capacity", 0.0)]:
        _, w, keep = keep_of(name, knob, k_min=1)
        assert (keep.sum(-1) == 1).all(), name


def test_bad_peer_rule():
    with pytest.raises(ValueError, match="peer rule 'topp' is not one of"):
        PeerRule("topp", 0.5)


def single_device_table(model) -> CostTable:
    signature = signature_of(model.config, None, jnp.float32, "loop")
    placement = block_placement(model.config.n_routed_experts, 1)
    return CostTable(signature, (DEVICE,), placement, FIT)


def test_off_and_theta_zero_are_bit_identical_to_no_pruning():
    plain = caee_jax.init_random("tiny", seed=5)
    table = single_device_table(plain)
    want = np.asarray(plain(TOKENS))
    for rule in (CAEEConfig(enabled=False, theta=5.0), CAEEConfig(theta=0.0)):
        model = caee_jax.init_random("tiny", seed=5, execution=Execution(pruning=rule, cost_table=table))
        np.testing.assert_array_equal(np.asarray(model(TOKENS)), want)


def test_caee_prunes_inside_the_model_and_reports_it():
    plain = caee_jax.init_random("tiny", seed=5)
    execution = Execution(pruning=CAEEConfig(theta=1.0), cost_table=single_device_table(plain))
    model = caee_jax.init_random("tiny", seed=5, execution=execution)
    out = model.module(jnp.asarray(TOKENS), execution=execution)
    keep = np.asarray(out.routing.keep_mask)
    assert 0 < (~keep).sum() < keep.size
    assert not np.allclose(np.asarray(out.logits), np.asarray(plain(TOKENS)), atol=1e-4)


def test_generation_counts_decode_pairs_and_active_experts():
    """Generation.decode_routing: routed pairs = steps x MoE layers x batch x K; pruning keeps fewer pairs
    and experts; without pruning every pair and expert runs."""
    plain = caee_jax.init_random("tiny", seed=5)
    execution = Execution(pruning=CAEEConfig(theta=1.5), cost_table=single_device_table(plain))
    pruned = caee_jax.init_random("tiny", seed=5, execution=execution)
    config = plain.config
    for model in (plain, pruned):
        result = generate_with_stats(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, stop=[])
        routed, kept, active, active_kept = result.decode_routing
        assert routed == 5 * config.num_moe_layers * 2 * config.num_experts_per_tok
        if model is plain:
            assert (kept, active_kept) == (routed, active) and result.pruned_pair_fraction == 0
        else:
            assert kept < routed and active_kept < active
            assert result.pruned_pair_fraction == 1 - kept / routed


def test_caee_without_a_matching_table_is_an_error():
    plain = caee_jax.init_random("tiny", seed=5)
    with pytest.raises(ValueError, match="CAEE needs a cost table"):
        caee_jax.init_random("tiny", execution=Execution(pruning=CAEEConfig()))(TOKENS)
    table = dataclasses.replace(single_device_table(plain))
    model = caee_jax.init_random(
        "tiny", mesh=mesh_of("expert=2"), execution=Execution(pruning=CAEEConfig(), cost_table=table)
    )
    with pytest.raises(ValueError, match=r"16 experts on 1 device\(s\); this layer has 16 experts on 2 expert shard"):
        model(TOKENS)


def test_a_plan_refuses_a_table_of_another_backend():
    """The backend has one source of truth: a table priced for `loop` cannot drive a `dense` plan."""
    table = single_device_table(caee_jax.init_random("tiny", seed=5))
    with pytest.raises(ValueError, match="the cost table prices backend 'loop'; this plan runs 'dense'"):
        Execution("dense", pruning=CAEEConfig(), cost_table=table)


def test_strategies_are_enums_that_read_as_their_names():
    rule = CAEEConfig(target="next", compensation="renorm")
    assert rule.target is Target.NEXT and rule.target == "next" and rule.compensation == "renorm"
    same = CAEEConfig(target=Target.NEXT, compensation="renorm")
    assert rule == same and hash(rule) == hash(same)  # one compiled program for either spelling
    assert repr(PeerRule("top_p", 0.9).name) == "'top_p'"
    with pytest.raises(ValueError, match="target 'nearest' is not one of"):
        CAEEConfig(target="nearest")
    with pytest.raises(ValueError, match="dispatch 'scatter' is not one of"):
        Execution(dispatch="scatter")


def test_a_peer_rule_gives_the_same_logits_on_a_mesh():
    execution = Execution(pruning=PeerRule("top_p", 0.6))
    single = caee_jax.init_random("tiny", seed=5, execution=execution)
    sharded = caee_jax.init_random("tiny", seed=5, execution=execution, mesh=mesh_of("data=2,expert=4"))
    np.testing.assert_allclose(np.asarray(sharded(TOKENS)), np.asarray(single(TOKENS)), atol=1e-5, rtol=0)
