"""Calibrating a cost table on the real devices: microbenchmarks of one MoE layer's experts, then a fit.

1. Compute, per device: the device's own experts run through the real backend (`run_experts`, the
   work it does under expert parallelism) on random routings: batch sizes 1-64, few or many active
   experts, uniform or skewed popularity, some pairs pruned. Non-negative least squares of the
   time on [1, computed rows, active experts] gives fixed_s, pair_s, activation_s.
2. Fetch, per offload tier and per process (each on its own device): one expert's weights copied host
   RAM -> device, and read from disk with O_DIRECT (page cache bypassed) -> device.
3. Communication, with several devices: the whole expert-parallel layer (`run_experts_parallel`, the
   model's decode dispatch, tokens split over the mesh as decode splits them) is timed on the same
   routings; what the slowest device's compute does not explain is fitted as a fixed part plus a
   per-token part, the same on every device (a layer time does not say whose wait it was). Each device
   computes the pairs routed to its experts, from every device in the `data_expert` layout: the pairs it
   receives.

Every process runs the same calls in the same order (collectives need it); process 0 gathers the
per-device fits. A time is the fastest of a few round-robin rounds' medians (`fastest_medians`), in
seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import mmap
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from caee_jax.caee.cost_model import computed_rows, predict
from caee_jax.caee.cost_table import CostTable, DeviceCosts, FitQuality, block_placement
from caee_jax.calibration.tables import signature_of
from caee_jax.experts import ExpertWeights, run_experts
from caee_jax.parallel.expert_parallel import Dispatch, auto_dispatch, expert_shards, run_experts_parallel
from caee_jax.parallel.placement import batch_sharding, mesh_context, padded_batch, replicated, to_mesh
from caee_jax.routing.storage import Storage
from caee_jax.runtime.steps import step_jit

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64)
ROUNDS = 3  # timed rounds per call; the fastest round's median counts (`fastest_medians`)
EXPERT_PATHS = (
    ("moe_layers", "ffn", "gate_proj"),
    ("moe_layers", "ffn", "up_proj"),
    ("moe_layers", "ffn", "down_proj"),
)
SCALE_PATHS = tuple((*path[:-1], path[-1].replace("_proj", "_scale")) for path in EXPERT_PATHS)  # fp8 experts


@dataclasses.dataclass(frozen=True)
class Case:
    """One routing to time: topk_ids, keep_mask [N, K]."""

    topk_ids: np.ndarray
    keep_mask: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]


def random_cases(seed: int, per_size: int, num_experts: int, top_k: int, sizes=TOKEN_COUNTS) -> list[Case]:
    """`per_size` routings per token count: a random pool of active experts (top_k..E), uniform or
    Zipf-skewed popularity (exponent 0, 1 or 2), distinct experts per token, 0-50% of pairs pruned."""
    rng = np.random.default_rng(seed)
    cases = []
    for num_tokens, _ in itertools.product(sizes, range(per_size)):
        pool = rng.permutation(num_experts)[: rng.integers(top_k, num_experts + 1)]
        popularity = 1.0 / np.arange(1, len(pool) + 1) ** rng.choice([0.0, 1.0, 2.0])
        popularity /= popularity.sum()
        ids = np.stack([rng.choice(pool, size=top_k, replace=False, p=popularity) for _ in range(num_tokens)])
        keep = rng.random(ids.shape) >= rng.choice([0.0, 0.25, 0.5])
        cases.append(Case(ids.astype(np.int32), keep))
    return cases


def wall_time(call) -> float:
    """Seconds of call() to completion."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def fastest_medians(calls, *, repeats: int, rounds: int = ROUNDS, desc: str | None = None, clock=wall_time):
    """[len(calls)] seconds: per call, the fastest of `rounds` round medians, `repeats` runs in all (split evenly
    over the rounds), after one warm-up run each; clock(call) runs it once and gives its seconds. Rounds go
    round-robin over the calls, so a burst of other load on a shared machine (it lasts about a second here)
    slows a round of every call rather than all runs of a few: `benchmarks/bench_probe_repeatability.py`,
    docs/RESULTS.md."""
    rounds = max(1, min(rounds, repeats))
    per_round = -(-repeats // rounds)
    for call in calls:
        clock(call)
    times = np.empty((rounds, len(calls)))
    show = desc is not None and jax.process_index() == 0
    with tqdm(total=rounds * len(calls), desc=desc, disable=not show) as bar:
        for round_times in times:
            for i, call in enumerate(calls):
                round_times[i] = np.median([clock(call) for _ in range(per_round)])
                bar.update()
    return times.min(axis=0)


def nonnegative_lstsq(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||features @ c - target|| with c >= 0, by trying every subset of columns (few columns)."""
    best, best_err = np.zeros(features.shape[1]), np.inf
    for size in range(1, features.shape[1] + 1):
        for cols in itertools.combinations(range(features.shape[1]), size):
            coef, *_ = np.linalg.lstsq(features[:, cols], target, rcond=None)
            if (coef >= 0).all():
                err = np.sum((features[:, cols] @ coef - target) ** 2)
                if err < best_err:
                    best, best_err = np.zeros(features.shape[1]), err
                    best[list(cols)] = coef
    return best


def fit_quality(predicted: np.ndarray, measured: np.ndarray) -> FitQuality:
    residual = predicted - measured
    total = np.sum((measured - measured.mean()) ** 2)
    return FitQuality(
        samples=int(len(measured)),
        r2=float(1 - np.sum(residual**2) / total) if total > 0 else 1.0,
        mape=float(np.mean(np.abs(residual) / measured)),
        median_abs_residual_s=float(np.median(np.abs(residual))),
        max_abs_residual_s=float(np.max(np.abs(residual))),
    )


@step_jit(static_argnames=("backend",))
def _local_layer(x, topk_ids, topk_weights, keep_mask, weights, scales, layer_index, *, backend):
    """weights: [gate, up, down] stacks; scales: their fp8 block scales, or None."""
    weights, scales = ExpertWeights(*weights), scales and ExpertWeights(*scales)
    return run_experts(x, topk_ids, topk_weights, keep_mask, weights, backend, layer_index=layer_index, scales=scales)


@step_jit(static_argnames=("backend", "dispatch"))
def _parallel_layer(x, topk_ids, topk_weights, keep_mask, weights, scales, layer_index, *, backend, dispatch):
    weights, scales = ExpertWeights(*weights), scales and ExpertWeights(*scales)
    y, _ = run_experts_parallel(
        x,
        topk_ids,
        topk_weights,
        keep_mask,
        weights,
        backend,
        dispatch=dispatch,
        layer_index=layer_index,
        scales=scales,
    )
    return y


def _in_mesh(mesh, fn):
    """fn() with `mesh` as the context mesh (how the expert-parallel layer runs)."""
    with mesh_context(mesh):
        return fn()


class Bench:
    """Times one MoE layer (index 0) of a loaded `caee_jax.Model` on its devices."""

    def __init__(self, model, repeats: int = 15, rounds: int = ROUNDS):
        if model.placement is not None:
            raise ValueError(
                "cost tables are measured on a model without EPLB replicas (one slot per expert); this model is placed "
                "with a Placement: load it without one to calibrate or probe (a table is moved onto slots by itself)"
            )
        self.model = model
        self.config = model.config
        self.backend = model.execution.backend
        self.repeats, self.rounds = repeats, rounds
        flat = dict(nnx.to_flat_state(model.state))
        self.weights = [flat[path].get_value() for path in EXPERT_PATHS]  # global [L, E, ...] arrays
        self.scales = [flat[path].get_value() for path in SCALE_PATHS] if SCALE_PATHS[0] in flat else None
        self.num_shards = expert_shards(model.mesh)
        self.per_shard = self.config.n_routed_experts // self.num_shards
        self.placement = block_placement(self.config.n_routed_experts, self.num_shards)
        self.rng = np.random.default_rng(0)

    def local_shards(self) -> dict[int, tuple]:
        """Expert shard -> this process's (device, [gate, up, down] local arrays, their local fp8 scales or
        None) for shards it holds."""
        scales = [{p.device: p.data for p in s.addressable_shards} for s in self.scales or ()]
        shards = {}
        for pieces in zip(*(w.addressable_shards for w in self.weights), strict=True):
            shard = (pieces[0].index[1].start or 0) // self.per_shard
            device = pieces[0].device
            local_scales = [by_device[device] for by_device in scales] if self.scales else None
            shards.setdefault(shard, (device, [p.data for p in pieces], local_scales))
        return shards

    def _inputs(self, case: Case):
        x = self.rng.normal(size=(case.num_tokens, self.config.hidden_size)).astype(np.float32)
        weights = np.full(case.topk_ids.shape, 1.0 / case.topk_ids.shape[1], np.float32)
        return x.astype(self.model.dtype), weights

    def local_call(self, case: Case, shard: int, device, local_weights, local_scales=None):
        """A zero-argument call: the shard's own pairs on its device, the work it does in the gather dispatch."""
        x, weights = self._inputs(case)
        local = case.topk_ids - shard * self.per_shard
        mine = case.keep_mask & (local >= 0) & (local < self.per_shard)
        args = [jax.device_put(a, device) for a in (x, np.where(mine, local, 0).astype(np.int32), weights, mine)]
        layer = jax.device_put(np.int32(0), device)
        return functools.partial(_local_layer, *args, local_weights, local_scales, layer, backend=self.backend)

    def layer_call(self, case: Case):
        """A zero-argument call: the whole layer's routed experts, one device or expert-parallel over the mesh."""
        x, weights = self._inputs(case)
        if self.model.mesh is None:
            args = (x, case.topk_ids, weights, case.keep_mask, self.weights, self.scales, np.int32(0))
            return functools.partial(_local_layer, *args, backend=self.backend)
        mesh = self.model.mesh
        dispatch = self.model.execution.dispatch
        dispatch = auto_dispatch(mesh, decode=True) if dispatch is Dispatch.AUTO else dispatch
        # As decode runs it: tokens split as the rules table splits the batch, padded with rows that run
        # nothing (`generate`'s dummy rows) when they do not divide it.
        rows = padded_batch(mesh, case.num_tokens)
        tokens = [
            np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])
            for a in (x, case.topk_ids, weights, case.keep_mask)
        ]
        with mesh_context(mesh):
            args = [to_mesh(a, batch_sharding(mesh, a.ndim)) for a in tokens]
            layer = to_mesh(np.int32(0), replicated(mesh))
        fn = functools.partial(
            _parallel_layer, *args, self.weights, self.scales, layer, backend=self.backend, dispatch=dispatch
        )
        return functools.partial(_in_mesh, mesh, fn)

    def time(self, calls, desc: str | None = None) -> np.ndarray:
        """[len(calls)] seconds (`fastest_medians` with this bench's repeats and rounds)."""
        return fastest_medians(calls, repeats=self.repeats, rounds=self.rounds, desc=desc)

    def shard_features(self, case: Case) -> np.ndarray:
        """[S, 3]: (1, computed rows, active experts) of each expert shard."""
        kept = case.topk_ids[case.keep_mask]
        pairs = np.bincount(kept, minlength=self.config.n_routed_experts)
        tile = self.backend.row_tile(case.num_tokens * self.config.num_experts_per_tok, self.config.n_routed_experts)
        rows = np.asarray(computed_rows(pairs, tile))
        placement = np.asarray(self.placement)
        per_rows = np.bincount(placement, weights=rows, minlength=self.num_shards)
        per_active = np.bincount(placement, weights=pairs > 0, minlength=self.num_shards)
        return np.stack([np.ones(self.num_shards), per_rows, per_active], axis=1)


def measure_fetch(bench: Bench, scratch_dir: str) -> tuple[float, float]:
    """Seconds to bring one expert's weights (gate, up, down) to the device from host RAM and from disk, in
    the dtype they are stored in (fp8: without the block scales, 1/4096 of the bytes)."""
    config = bench.config
    shapes = [(config.hidden_size, config.moe_intermediate_size)] * 2 + [
        (config.moe_intermediate_size, config.hidden_size)
    ]
    stored = Storage.of(bench.model.weights, bench.model.dtype).dtype
    host = [np.ones(s, stored) for s in shapes]
    device = jax.devices()[0] if bench.model.mesh is None else jax.local_devices()[0]
    nbytes = sum(a.nbytes for a in host)
    size = -(-nbytes // 4096) * 4096
    fd_tmp, path = tempfile.mkstemp(dir=scratch_dir, suffix=".expert")
    try:
        with os.fdopen(fd_tmp, "wb") as f:
            f.write(b"".join(a.tobytes() for a in host).ljust(size, b"\0"))
            f.flush()
            os.fsync(f.fileno())
        buffer = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT requires

        def read_from_disk():
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                os.preadv(fd, [buffer], 0)
            finally:
                os.close(fd)
            flat = np.frombuffer(buffer, np.uint8, nbytes).view(stored)
            parts = np.split(flat, np.cumsum([np.prod(s) for s in shapes])[:-1])
            return [jax.device_put(p.reshape(s), device) for p, s in zip(parts, shapes, strict=True)]

        try:
            from_host, from_disk = bench.time([lambda: [jax.device_put(a, device) for a in host], read_from_disk])
        except OSError as error:
            raise OSError(
                f"{scratch_dir}: cannot time direct disk reads there ({error}); pass another scratch dir"
            ) from error
    finally:
        os.unlink(path)
    return from_host, from_disk


def calibrate(
    model,
    *,
    cases_per_size: int = 15,
    repeats: int = 15,
    rounds: int = ROUNDS,
    scratch_dir: str = ".",
    seed: int = 1,
) -> CostTable:
    """A cost table for `model` on its mesh (every process calls this; all get the same table). repeats: timed
    runs per routing, in `rounds` rounds (`fastest_medians`)."""
    bench = Bench(model, repeats, rounds)
    config = model.config
    cases = random_cases(seed, cases_per_size, config.n_routed_experts, config.num_experts_per_tok)
    shards = bench.local_shards()
    coefficients = np.zeros((bench.num_shards, 3))
    held = np.zeros(bench.num_shards, bool)
    quality = []
    for shard, (device, local_weights, local_scales) in shards.items():
        calls = [bench.local_call(case, shard, device, local_weights, local_scales) for case in cases]
        times = bench.time(calls, desc=f"compute, shard {shard}")
        features = np.stack([bench.shard_features(case)[shard] for case in cases])
        coefficients[shard] = nonnegative_lstsq(features, times)
        held[shard] = True
        quality.append((features @ coefficients[shard], times))
    fetch = np.tile(measure_fetch(bench, scratch_dir), (bench.num_shards, 1))  # [S, 2]: this process's device
    if jax.process_count() > 1:  # each shard's fit and fetch times from the first process holding it
        first = multihost_utils.process_allgather(held).argmax(axis=0)  # [S]
        shard = np.arange(bench.num_shards)
        coefficients = multihost_utils.process_allgather(coefficients)[first, shard]  # from [processes, S, 3]
        fetch = multihost_utils.process_allgather(fetch)[first, shard]

    comm_fixed, comm_token = 0.0, 0.0
    if bench.num_shards > 1:
        layer = bench.time([bench.layer_call(case) for case in cases], desc="expert-parallel layer")
        compute = np.array([np.sum(bench.shard_features(case) * coefficients, axis=1).max() for case in cases])
        tokens = np.array([case.num_tokens for case in cases], np.float64)
        comm_fixed, comm_token = nonnegative_lstsq(np.stack([np.ones_like(tokens), tokens], 1), layer - compute)
        predicted = compute + comm_fixed + comm_token * tokens
        quality = [(predicted, layer)]
    devices = tuple(
        DeviceCosts(
            fixed_s=float(c[0] + comm_fixed),
            pair_s=float(c[1]),
            activation_s=float(c[2]),
            fetch_s=(0.0, float(from_host), float(from_disk)),
            comm_token_s=float(comm_token),
        )
        for c, (from_host, from_disk) in zip(coefficients, fetch, strict=True)
    )
    predicted, measured = (np.concatenate(parts) for parts in zip(*quality, strict=True))
    signature = signature_of(config, model.mesh, model.dtype, bench.backend, model.weights)
    return CostTable(signature, devices, bench.placement, fit_quality(predicted, measured))


@dataclasses.dataclass(frozen=True)
class Validation:
    """Predicted against measured layer times (s) on fresh routings."""

    predicted_s: np.ndarray
    measured_s: np.ndarray
    num_tokens: np.ndarray

    @property
    def mape(self) -> float:
        return float(np.mean(np.abs(self.predicted_s - self.measured_s) / self.measured_s))

    def summary(self) -> dict:
        errors = np.abs(self.predicted_s - self.measured_s) / self.measured_s
        return dict(
            cases=int(len(self.measured_s)),
            mape=self.mape,
            median_ape=float(np.median(errors)),
            p90_ape=float(np.quantile(errors, 0.9)),
            max_ape=float(errors.max()),
            measured_ms_range=[float(1e3 * self.measured_s.min()), float(1e3 * self.measured_s.max())],
        )


def validate(
    model,
    table: CostTable,
    *,
    cases_per_size: int = 8,
    repeats: int = 15,
    rounds: int = ROUNDS,
    seed: int = 2,
    sizes=TOKEN_COUNTS,
    progress: bool = True,
) -> Validation:
    """Measures the layer on routings never used for calibration (`sizes`: token counts) and compares with
    `predict`; timed as `calibrate` times them."""
    bench = Bench(model, repeats, rounds)
    config = model.config
    cases = random_cases(seed, cases_per_size, config.n_routed_experts, config.num_experts_per_tok, sizes)
    measured = bench.time([bench.layer_call(case) for case in cases], desc="validation" if progress else None)
    predict_fn = jax.jit(functools.partial(predict, table))
    predicted = np.array([float(predict_fn(case.topk_ids, case.keep_mask).layer_s) for case in cases])
    return Validation(predicted, measured, np.array([case.num_tokens for case in cases]))
