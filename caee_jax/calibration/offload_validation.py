"""The cost model with non-resident experts, calibrated and validated in situ: one offloaded MoE layer timed
as it runs.

Each case is a fresh routing (`costs.random_cases`) and a cold-ish cache: a random set of 0..S experts of
MoE layer 0 resident (`CacheManager.hold`, restored before every timed run), the others in the store. The
layer runs the real offloaded path (`offload.execute.run_offloaded`: host callbacks, the store's reads and
its background reads of the layer's misses, slot writes), timed as `costs.fastest_medians` times the
resident layer (round-robin rounds, the fastest round's median), and compared with `predict`
given that residency, where each kept miss costs its tier's `fetch_s`, the layer its tier's `offload_layer_s`
and a layer with a kept miss its `offload_read_s` from the table.

A resident calibration times fetch_s apart from the runtime (one expert read and `device_put`,
`costs.measure_fetch`) and has no per-layer offload costs, so the offloaded path's own costs are fitted here: the
time a case takes beyond its all-resident prediction as a fixed part per layer (the dispatch of a computation with
effects, paid even without a miss), a part per layer with a kept miss (its host callback: a layer without one makes
none) and a part per kept miss (non-negative least squares). `calibrate_offloaded` writes them into the table
(routings of another seed than the validation's); the summary also reports the fit's MAPE on held-out halves
(two-fold). Times in seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from caee_jax.caee.cost_model import predict
from caee_jax.caee.cost_table import CostTable
from caee_jax.calibration.costs import Validation, fastest_medians, nonnegative_lstsq, random_cases
from caee_jax.offload.execute import run_offloaded

LAYER = 0  # the MoE layer timed
CALIBRATION_SEED = 3  # `calibrate_offloaded`'s routings; `validate_offloaded` defaults to another seed


@functools.partial(jax.jit, static_argnames=("manager",), donate_argnames=("cache",))
def _offloaded_layer(x, topk_ids, topk_weights, keep_mask, cache, layer_index, next_hint, *, manager):
    return run_offloaded(x, topk_ids, topk_weights, keep_mask, cache, layer_index, manager, next_hint)


@dataclasses.dataclass(frozen=True)
class OffloadValidation(Validation):
    """Validation plus, per case, misses [cases] (kept pairs' experts not resident) and the all-resident
    prediction [cases]; fetch_s, offload_layer_s, offload_read_s: the table's per-miss, per-layer and
    per-reading-layer prices of the store's tier (s)."""

    misses: np.ndarray
    resident_predicted_s: np.ndarray
    fetch_s: float
    offload_layer_s: float
    offload_read_s: float
    tier: str

    def in_situ_costs(self, cases: np.ndarray) -> np.ndarray:
        """[fixed s per layer, s per layer with a kept miss, s per kept miss] fitted on `cases` (indices) to the
        time beyond the all-resident prediction."""
        return nonnegative_lstsq(self._features(cases), self.measured_s[cases] - self.resident_predicted_s[cases])

    def _features(self, cases: np.ndarray) -> np.ndarray:
        """[cases, 3]: 1, whether the case has a kept miss, its kept misses."""
        misses = self.misses[cases]
        return np.stack([np.ones(len(cases)), (misses > 0).astype(np.float64), misses], axis=1)

    def in_situ_prediction(self, cases: np.ndarray, costs: np.ndarray) -> np.ndarray:
        """Predicted s of `cases` (indices) with the in-situ `costs` (`in_situ_costs`) instead of the table's."""
        return self.resident_predicted_s[cases] + self._features(cases) @ costs

    def summary(self) -> dict:
        """Validation.summary (of the table as stored), plus the misses, the MAPE of the cases without one, the table's
        fetch_s, offload_layer_s and offload_read_s, the in-situ fit of all three and the MAPE of predictions that
        use it (two-fold: each half predicted with the other half's fit)."""
        halves = np.arange(len(self.misses)) % 2
        folds = [np.flatnonzero(halves == h) for h in (0, 1)]
        refit = np.empty_like(self.measured_s)
        for fit, test in (folds, folds[::-1]):
            refit[test] = self.in_situ_prediction(test, self.in_situ_costs(fit))
        errors = np.abs(refit - self.measured_s) / self.measured_s
        fixed, read, per_miss = self.in_situ_costs(np.arange(len(self.misses)))
        hits_only = self.misses == 0
        return super().summary() | dict(
            tier=self.tier,
            misses_per_case=[float(self.misses.min()), float(self.misses.mean()), float(self.misses.max())],
            mape_without_misses=float(
                np.mean(np.abs(self.predicted_s - self.measured_s)[hits_only] / self.measured_s[hits_only])
            )
            if hits_only.any()
            else None,
            table_fetch_s=self.fetch_s,
            table_offload_layer_s=self.offload_layer_s,
            table_offload_read_s=self.offload_read_s,
            in_situ_fixed_s=float(fixed),
            in_situ_read_s=float(read),
            in_situ_fetch_s=float(per_miss),
            in_situ_mape=float(errors.mean()),
            in_situ_median_ape=float(np.median(errors)),
        )


def validate_offloaded(
    model, table: CostTable, *, cases_per_size: int = 8, repeats: int = 15, seed: int = 2
) -> OffloadValidation:
    """Times MoE layer 0 of an offloaded `model` (`caee_jax.load(..., offload=...)`) on fresh routings, each
    with a random cold-ish residency, against `predict` with that residency."""
    manager = model.execution.offload
    if manager is None:
        raise ValueError("validate_offloaded needs a model with offloaded experts (load it with offload=...)")
    config = model.config
    num_experts, tier = config.n_routed_experts, manager.store.tier_index
    cases = random_cases(seed, cases_per_size, num_experts, config.num_experts_per_tok)
    rng = np.random.default_rng(seed)
    predict_fn = jax.jit(lambda ids, keep, tiers: predict(table, ids, keep, tiers).layer_s)
    no_hint = np.zeros(num_experts, bool)  # no next-layer prefetch: the layer on its own
    setups, predicted, resident_predicted, misses = [], [], [], []
    for case in cases:
        residents = rng.permutation(num_experts)[: rng.integers(0, manager.slots + 1)]
        tiers = np.full(num_experts, tier, np.int32)
        tiers[residents] = 0
        x = rng.normal(size=(case.num_tokens, config.hidden_size)).astype(model.dtype)
        weights = np.full(case.topk_ids.shape, 1.0 / case.topk_ids.shape[1], np.float32)
        setups.append((residents, (x, case.topk_ids, weights, case.keep_mask)))
        predicted.append(float(predict_fn(case.topk_ids, case.keep_mask, tiers)))
        resident_predicted.append(float(predict_fn(case.topk_ids, case.keep_mask, np.zeros_like(tiers))))
        kept = np.unique(case.topk_ids[case.keep_mask])
        misses.append(np.sum(tiers[kept] > 0))
    cache = model.expert_cache

    def run(residents, args) -> float:
        """One layer call from this residency (setting it is not timed): seconds."""
        nonlocal cache
        cache = jax.block_until_ready(manager.hold(cache, LAYER, residents))
        manager.take_step_stats(cache)
        start = time.perf_counter()
        _, cache = _offloaded_layer(*args, cache, np.int32(LAYER), no_hint, manager=manager)
        jax.block_until_ready(cache)
        return time.perf_counter() - start

    # timed as the resident layer is (the first run of each compiles, once, and warms up)
    calls = [functools.partial(run, *setup) for setup in setups]
    measured = fastest_medians(calls, repeats=repeats, desc="offloaded validation", clock=lambda call: call())
    model.expert_cache = cache
    return OffloadValidation(
        np.array(predicted),
        np.array(measured),
        np.array([case.num_tokens for case in cases]),
        misses=np.array(misses, np.float64),
        resident_predicted_s=np.array(resident_predicted),
        fetch_s=float(table.devices[0].fetch_s[tier]),
        offload_layer_s=float(table.devices[0].offload_layer_s[tier]),
        offload_read_s=float(table.devices[0].offload_read_s[tier]),
        tier=manager.store.tier,
    )


def calibrate_offloaded(
    model, table: CostTable, *, cases_per_size: int = 8, repeats: int = 15
) -> tuple[CostTable, OffloadValidation]:
    """`table` (one device) with its store tier's fetch_s, offload_layer_s and offload_read_s fitted in situ on an
    offloaded `model` (`validate_offloaded`'s timing, on routings of CALIBRATION_SEED), and the timings they were
    fitted to."""
    if table.num_devices != 1:
        raise ValueError(f"offloaded experts run on one device; this table has {table.num_devices}")
    timed = validate_offloaded(model, table, cases_per_size=cases_per_size, repeats=repeats, seed=CALIBRATION_SEED)
    fixed, read, per_miss = timed.in_situ_costs(np.arange(len(timed.misses)))
    tier = model.execution.offload.store.tier_index
    device = table.devices[0].with_tier(tier, offload_layer_s=fixed, offload_read_s=read, fetch_s=per_miss)
    return dataclasses.replace(table, devices=(device,)), timed
