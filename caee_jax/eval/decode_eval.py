"""Teacher-forced decoding, pruned against unpruned, side by side: accuracy metrics and step times.

Each batch holds B windows of held-out text. Both models prefill the windows' first `prefix` tokens
(unpruned, so both start from the same cache), then decode `steps` tokens one step at a time, each
fed the true next token (teacher forcing), so every step is a real decode step of a batch of B
concurrent sequences: what the policy sees in serving. At every step the baseline (unpruned) and
the candidate run alternately and are timed; the metrics compare their next-token distributions.

Offloaded experts: each side has its own expert cache and cache manager (`CacheManager.twin`), so one
never warms the other's. Both caches start empty for each batch of windows and are warmed alike, by an
unpruned prefill of the same prefix through each side's own manager; then every decode step's cache
statistics (hits, misses, blocking fetches, bytes read, pruned misses) are recorded per side.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from caee_jax.caee.peer_rules import PeerRule
from caee_jax.choice import Choice
from caee_jax.model.execution import Execution
from caee_jax.offload.cache import StepStats
from caee_jax.parallel.placement import batch_sharding, mesh_context, padded_batch, to_mesh
from caee_jax.runtime import steps
from caee_jax.stats import clustered_se, paired_ratio


@dataclasses.dataclass
class Comparison:
    """Per predicted token (M of them): candidate and baseline log-prob of the truth, argmax hits,
    agreement, KL(baseline || candidate), the window it belongs to (0, 1, ... over every batch compared);
    per step: both step times (s); pair and expert counts; predicted MoE time per layer and device [L, S],
    unpruned and as run (s); offloaded, both sides' expert cache statistics."""

    nll: list = dataclasses.field(default_factory=list)
    nll_base: list = dataclasses.field(default_factory=list)
    correct: list = dataclasses.field(default_factory=list)
    correct_base: list = dataclasses.field(default_factory=list)
    agree: list = dataclasses.field(default_factory=list)
    kl: list = dataclasses.field(default_factory=list)
    window: list = dataclasses.field(default_factory=list)
    windows: int = 0
    step_s: list = dataclasses.field(default_factory=list)
    step_base_s: list = dataclasses.field(default_factory=list)
    kept_pairs: int = 0
    total_pairs: int = 0
    active_experts: list = dataclasses.field(default_factory=list)
    active_experts_base: list = dataclasses.field(default_factory=list)
    predicted_s: list = dataclasses.field(default_factory=list)
    predicted_unpruned_s: list = dataclasses.field(default_factory=list)
    offload: list = dataclasses.field(default_factory=list)
    offload_base: list = dataclasses.field(default_factory=list)

    def step_cut_interval(self, statistic=np.median) -> tuple[float, float, float]:
        """The decode step-time cut 1 - median(pruned) / median(unpruned) (statistic np.mean: of the mean step,
        the time per output token) and its bootstrap 95% interval (low, high), over the steps timed
        alternately (the first, which compiles, left out)."""
        ratio, low, high = paired_ratio(self.step_base_s[1:], self.step_s[1:], statistic)
        return 1 - ratio, 1 - high, 1 - low

    def summary(self) -> dict:
        """The case's figures; offloaded, `offload` holds each side's cache statistics (`offload_summary`)."""
        per_token = ("nll", "nll_base", "correct", "correct_base", "agree", "kl", "window")
        cat = {name: np.concatenate(getattr(self, name)) for name in per_token}
        timed_base, timed = np.array(self.step_base_s[1:]), np.array(self.step_s[1:])  # first step: compile
        _, cut_low, cut_high = self.step_cut_interval()
        _, mean_cut_low, mean_cut_high = self.step_cut_interval(np.mean)
        gained = cat["correct"].astype(np.float64) - cat["correct_base"]  # paired: -1, 0 or 1 per token
        nll_rise = cat["nll"].astype(np.float64) - cat["nll_base"]
        predicted, unpruned = np.array(self.predicted_s), np.array(self.predicted_unpruned_s)  # [steps, L, S]
        return dict(
            tokens=int(len(cat["nll"])),
            top1_acc=float(cat["correct"].mean()),
            top1_acc_unpruned=float(cat["correct_base"].mean()),
            top1_diff_se=float(gained.std(ddof=1) / np.sqrt(len(gained))),
            # Counting a window's tokens as one draw (`stats.clustered_se`): they share a context.
            top1_diff_se_windows=clustered_se(gained, cat["window"]),
            nll_diff_se_windows=clustered_se(nll_rise, cat["window"]),
            agreement=float(cat["agree"].mean()),
            ppl=float(np.exp(cat["nll"].mean())),
            ppl_unpruned=float(np.exp(cat["nll_base"].mean())),
            kl=float(cat["kl"].mean()),
            step_time_s=float(np.median(timed)),
            step_time_unpruned_s=float(np.median(timed_base)),
            step_cut_interval=[cut_low, cut_high],
            # The mean step, the time per output token: where step times have modes (batch 1 offloaded: layers
            # that read or not), the median can jump between them; the mean moves smoothly.
            mean_step_time_s=float(np.mean(timed)),
            mean_step_time_unpruned_s=float(np.mean(timed_base)),
            mean_step_cut_interval=[mean_cut_low, mean_cut_high],
            timed_steps=len(timed),
            pruned_pair_fraction=1.0 - self.kept_pairs / max(self.total_pairs, 1),
            active_experts_per_layer=float(np.mean(self.active_experts)),
            active_experts_per_layer_unpruned=float(np.mean(self.active_experts_base)),
            predicted_moe_s=float(np.median(predicted.max(-1).sum(-1))),  # a layer ends with its slowest device
            predicted_moe_unpruned_s=float(np.median(unpruned.max(-1).sum(-1))),
            predicted_device_s=predicted.sum(1).mean(0).tolist(),  # per device: mean per step over the layers
            predicted_device_unpruned_s=unpruned.sum(1).mean(0).tolist(),
        ) | (
            dict(offload=dict(unpruned=offload_summary(self.offload_base), pruned=offload_summary(self.offload)))
            if self.offload
            else {}
        )


def offload_summary(steps: list[StepStats]) -> dict:
    """Decode steps' cache statistics: each counter's mean per step (fetch_wait_s in seconds per step), and
    the hit rate and pre-gating recall over all the steps."""
    total = StepStats.total(steps)
    per_step = {name: value / len(steps) for name, value in vars(total).items()}
    return per_step | dict(hit_rate=total.hit_rate, prediction_recall=total.prediction_recall)


def windows_of(ids: np.ndarray, length: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` windows [count, length] at random offsets of the token stream ids (seeded)."""
    if len(ids) <= length:
        raise ValueError(f"the evaluation text has {len(ids)} tokens; need more than {length}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, count)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int32)


def compare(
    model,
    candidate: Execution,
    windows: np.ndarray,
    prefix: int,
    result: Comparison | None = None,
    table=None,
    timing_only: bool = False,
    candidate_model=None,
) -> Comparison:
    """Teacher-forced decode of windows [B, prefix + steps + 1], baseline (model.execution) vs candidate;
    with a cost table, each step's MoE time is also predicted, unpruned and as pruned. timing_only: only
    the alternated step times are added to `result` (more timing for a narrower cut interval). Offloaded, the
    candidate's `offload` is a manager of its own (`model.execution.offload.twin()`); the baseline's
    final expert cache is left on the model. A batch that does not split over the mesh is padded with
    dummy rows (copies of the first window) that run no expert and are left out of every figure.
    candidate_model: another `caee_jax.Model` of the same weights and mesh whose parameters run the candidate
    side (e.g. placed with EPLB replicas: `api.Model(placement=)`); None: `model`'s. With it, the unpruned
    prediction is the baseline's (model's placement) and the candidate's is as the candidate ran."""
    result = result or Comparison()
    batch, length = windows.shape
    rows = padded_batch(model.mesh, batch)
    valid = np.arange(rows) < batch
    windows = np.concatenate([windows, np.repeat(windows[:1], rows - batch, axis=0)])
    num_steps = length - prefix - 1
    baseline = model.execution
    managers = (baseline.offload, candidate.offload)
    offloaded = managers[0] is not None
    if offloaded != (managers[1] is not None) or (offloaded and managers[0] is managers[1]):
        raise ValueError("offloaded, the baseline and the candidate each need a cache manager of their own")
    candidate_model = candidate_model or model
    if candidate_model is not model and (offloaded or candidate_model.mesh != model.mesh):
        raise ValueError("a candidate model runs on the baseline's mesh, with its experts on device")
    sides = ((model, baseline), (candidate_model, candidate))
    mesh = model.mesh
    put = (lambda a: to_mesh(a, batch_sharding(mesh, a.ndim))) if mesh is not None else jnp.asarray
    num_layers = model.config.num_moe_layers
    with mesh_context(mesh):
        lengths, valid = put(np.full(rows, prefix, np.int32)), put(valid)
        greedy = (np.uint32(0), np.float32(0), np.float32(1))  # seed, temperature, top_p: the sample is unused
        prompts = put(windows[:, :prefix])
        experts, latents = [None, None], None
        for side, manager in enumerate(managers if offloaded else (None,)):  # each expert cache warmed alike
            experts[side] = None if manager is None else manager.empty_cache()
            _, prefilled, _, experts[side] = steps.prefill(
                model.graphdef, model.state, prompts, lengths, *greedy, experts[side], valid,
                cache_len=length, execution=dataclasses.replace(baseline, offload=manager),
            )  # fmt: skip
            latents = prefilled if latents is None else latents  # the baseline's
            if manager is not None:
                manager.take_step_stats(experts[side])
        caches = [latents, jax.tree.map(jnp.copy, latents)]  # the candidate's latents: the baseline's prefill
        for t in range(prefix, prefix + num_steps):
            tokens, positions = put(windows[:, t]), put(np.full(rows, t, np.int32))
            outputs = []
            for side, (runner, execution) in enumerate(sides):
                start_together()
                start = time.perf_counter()
                out = steps.teacher_forced_step(
                    runner.graphdef, runner.state, caches[side], tokens, positions, experts[side], valid,
                    execution=execution, table=table,
                )  # fmt: skip
                jax.block_until_ready(out)
                outputs.append((out, time.perf_counter() - start))
                caches[side], experts[side] = out[1], out[4]
            (base_lp, _, base_counts, base_predicted, _), base_s = outputs[0]
            (cand_lp, _, counts, predicted, _), cand_s = outputs[1]
            result.step_base_s.append(base_s)
            result.step_s.append(cand_s)
            if offloaded:
                stats = managers[0].take_step_stats(experts[0]), managers[1].take_step_stats(experts[1])
            if timing_only:
                continue
            _, kept, _, active = np.asarray(counts)
            base_lp, cand_lp = np.asarray(base_lp)[:batch], np.asarray(cand_lp)[:batch]
            truth = windows[:batch, t + 1]
            real = np.arange(batch)
            result.nll.append(-cand_lp[real, truth])
            result.nll_base.append(-base_lp[real, truth])
            result.correct.append(cand_lp.argmax(-1) == truth)
            result.correct_base.append(base_lp.argmax(-1) == truth)
            result.agree.append(cand_lp.argmax(-1) == base_lp.argmax(-1))
            result.kl.append(np.sum(np.exp(base_lp) * (base_lp - cand_lp), axis=-1))
            result.window.append(result.windows + real)
            result.kept_pairs += int(kept)
            result.total_pairs += batch * model.config.num_experts_per_tok * num_layers
            result.active_experts.append(int(active) / num_layers)
            result.active_experts_base.append(int(base_counts[3]) / num_layers)
            unpruned = predicted if candidate_model is model else base_predicted
            result.predicted_unpruned_s.append(np.asarray(unpruned[0]))
            result.predicted_s.append(np.asarray(predicted[1]))
            if offloaded:
                result.offload_base.append(stats[0])
                result.offload.append(stats[1])
    if offloaded:
        model.expert_cache = experts[0]
    result.windows += batch
    return result


def start_together() -> None:
    """On several processes, a barrier before each timed step, so that a step's time is its own: without it
    the side timed first also absorbed the wait for a slower process still doing the previous step's host
    work (with one of 2 processes slowed 2x, ~11 points of cut for rules that prune nothing)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("caee-eval-step")


def sweep(
    model,
    rules: Sequence,
    ids: np.ndarray,
    *,
    batch: int = 4,
    prefix: int = 32,
    steps_per_window: int = 8,
    table=None,
    seed: int = 0,
) -> list[dict]:
    """Each rule (a CAEEConfig or PeerRule) against the model unpruned, teacher-forced on `batch` windows of
    the token stream `ids` [M] (`compare`): one record per rule, as launch/eval.py writes them (rule, knob,
    batch_size, processes, the rule's settings and `Comparison.summary()`), the input of
    `report.plot_pareto` and `report.write_table`. table: the cost table CAEE rules use."""
    windows = windows_of(np.asarray(ids), prefix + steps_per_window + 1, batch, seed)
    records = []
    for rule in rules:
        name = rule.name.value if isinstance(rule, PeerRule) else "caee"
        settings = {
            f.name: getattr(rule, f.name).value if isinstance(getattr(rule, f.name), Choice) else getattr(rule, f.name)
            for f in dataclasses.fields(rule)
            if f.name not in ("name", "knob", "theta", "enabled")
        }
        knob = rule.knob if isinstance(rule, PeerRule) else rule.theta
        candidate = Execution(model.execution.backend, pruning=rule, cost_table=table)
        summary = compare(model, candidate, windows, prefix, table=table).summary()
        records.append(
            dict(rule=name, knob=float(knob), batch_size=batch, processes=jax.process_count(), **settings, **summary)
        )
    return records
