"""An offloaded run's per-step picture: how each decode step's time splits into waiting for expert fetches
and everything else (compute), with the blocking and prefetched fetch counts beneath."""

from __future__ import annotations

import os

from caee_jax.files import atomic_write
from caee_jax.offload.cache import StepStats


def offload_report(prefill: StepStats, steps: list[StepStats], step_s: list[float]) -> dict:
    """JSON-ready statistics: the prefill's, each decode step's (with its wall time step_s, seconds) and
    their decode totals."""
    total = StepStats.total(steps)
    per_step = [stats.as_dict() | {"step_s": seconds} for stats, seconds in zip(steps, step_s, strict=True)]
    return {"prefill": prefill.as_dict(), "decode_total": total.as_dict(), "decode_steps": per_step}


def plot_timeline(steps: list[StepStats], step_s: list[float], path: str, title: str = "") -> None:
    """Stacked bars per decode step (ms): time inside expert fetches, and the rest of the step; below, the
    step's blocking and prefetched fetches. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = range(1, len(steps) + 1)
    fetch_ms = [1e3 * min(s.fetch_wait_s, t) for s, t in zip(steps, step_s, strict=True)]
    rest_ms = [1e3 * t - f for t, f in zip(step_s, fetch_ms, strict=True)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=(2, 1))
    top.bar(index, fetch_ms, color="tab:red", label="waiting for expert fetches")
    top.bar(index, rest_ms, bottom=fetch_ms, color="tab:blue", label="compute (rest of the step)")
    top.set(ylabel="decode step (ms)", title=title or "offloaded decode: fetch vs compute per step")
    top.legend(loc="upper right", fontsize=8)
    bottom.plot(index, [s.blocking_fetches for s in steps], marker=".", color="tab:red", label="blocking fetches")
    bottom.plot(index, [s.prefetched_fetches for s in steps], marker=".", color="tab:green", label="prefetched")
    bottom.plot(index, [s.pruned_misses for s in steps], marker=".", color="tab:grey", label="pruned misses")
    bottom.set(xlabel="decode step", ylabel="experts per step")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
