"""DeepSeek-R1 decode at scale by simulation: contiguous experts, EPLB, CAEE and EPLB + CAEE on 8-64 devices.

Routing: the bundled model's routing on its held-out text, re-sampled to 256 experts top-8
(`eval/simulate.py`); costs: R1 expert tables from this CPU's calibrated table scaled up, and from H100 /
H200 datasheet figures (`eval/r1_costs.py`). Prints a markdown table (mean per-MoE-layer time of the
slowest device) and the assumptions, and writes a plot.

    PYTHONPATH=. .venv/bin/python benchmarks/simulate_r1.py --plot docs/figures/r1_simulation.png
"""

from __future__ import annotations

import argparse
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import caee_jax  # noqa: E402
from caee_jax.caee.cost_table import DEFAULT_DIR, load_table  # noqa: E402
from caee_jax.caee.policy import CAEEConfig  # noqa: E402
from caee_jax.eval import r1_costs, simulate  # noqa: E402
from caee_jax.eval.scoring import score_tokens  # noqa: E402
from caee_jax.files import atomic_write  # noqa: E402

CPU_TABLE = "cpu-cpu-p2-data1_expert2_tensor1-d256-f256-e32-k4-float32-loop.json"


def cell(by: dict, method: str) -> str:
    """A method's layer time, and its speed-up over contiguous placement."""
    layer_s = by[method].layer_s
    return f"{layer_s * 1e6:,.0f} us" + (
        "" if method == "contiguous" else f" ({by['contiguous'].layer_s / layer_s:.2f}x)"
    )


def pruned(result: simulate.Result) -> str:
    return f"{result.pruned_pairs:.1%} ({result.pruned_mass:.1%})"


def table_rows(results: list[simulate.Result]) -> list[str]:
    """Markdown rows: per (device, devices, batch), each method's layer time and its cut vs contiguous."""
    rows = [
        "| device | devices | batch | contiguous | CAEE | EPLB | EPLB + CAEE | imbalance contiguous / EPLB "
        "| CAEE pruned pairs (mass) | EPLB + CAEE pruned pairs (mass) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases = {}
    for result in results:
        cases.setdefault((result.device, result.devices, result.batch), {})[result.method] = result
    for (device, devices, batch), by in cases.items():
        rows.append(
            f"| {device} | {devices} | {batch} | {' | '.join(cell(by, m) for m in simulate.METHODS)} "
            f"| {by['contiguous'].imbalance:.2f} / {by['eplb'].imbalance:.2f} | {pruned(by['caee'])} "
            f"| {pruned(by['eplb+caee'])} |"
        )
    return rows


def plot(results: list[simulate.Result], path: str) -> None:
    """Layer time against device count, one panel per (device model, batch), one line per method."""
    devices = list(dict.fromkeys(r.device for r in results))
    batches = sorted({r.batch for r in results})
    fig, axes = plt.subplots(len(devices), len(batches), figsize=(4 * len(batches), 3.2 * len(devices)), squeeze=False)
    for i, device in enumerate(devices):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for method in simulate.METHODS:
                points = [
                    (r.devices, r.layer_s * 1e6)
                    for r in results
                    if (r.device, r.batch, r.method) == (device, batch, method)
                ]
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{device}, batch {batch}", fontsize=10)
            ax.set_xlabel("devices")
            ax.set_ylabel("MoE layer time (us, slowest device)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("R1 decode by simulation (cost model; assumptions in docs/RESULTS.md)", fontsize=11)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="8,16,32,64")
    parser.add_argument("--batches", default="16,64,256,4096", help="tokens per decode step, whole deployment")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens routed (half history, half steps)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps simulated per case and MoE layer")
    parser.add_argument("--redundant", type=int, default=32, help="EPLB's extra slots (rounded up to the devices)")
    parser.add_argument("--theta", type=float, default=CAEEConfig().theta)
    parser.add_argument("--device-models", default="cpu-scaled,H100,H200")
    parser.add_argument("--plot", help="PNG to write")
    args = parser.parse_args()

    model = caee_jax.load()
    model_dir = os.path.dirname(caee_jax.__file__) + "/assets/caee-small"
    with open(os.path.join(model_dir, "heldout.txt")) as f:
        ids = model.text_ids(f.read())[: args.tokens + 1]
    scores = score_tokens(model, ids, window=512, batch=8, progress=False)
    r1_ids, r1_weights = simulate.r1_routing(scores.topk_ids, scores.topk_weights, model.config.n_routed_experts)
    known = [r1_costs.scaled_cpu(load_table(os.path.join(DEFAULT_DIR, CPU_TABLE))), r1_costs.H100, r1_costs.H200]
    device_models = [device for device in known if device.name in args.device_models.split(",")]
    caee = CAEEConfig(theta=args.theta)
    results = []
    for device in device_models:
        for devices in [int(d) for d in args.devices.split(",")]:
            for batch in [int(b) for b in args.batches.split(",")]:
                results += simulate.simulate(
                    r1_ids, r1_weights, device, devices, batch, steps=args.steps, redundant=args.redundant, caee=caee
                )
    print(f"routing: {r1_ids.shape[1]} held-out tokens x {r1_ids.shape[0]} MoE layers, re-sampled to 256 experts top-8")
    for name, routing, experts in (("bundled", scores.topk_ids, model.config.n_routed_experts), ("R1", r1_ids, 256)):
        loads = np.stack([np.bincount(layer.reshape(-1), minlength=experts) for layer in routing])
        skew = ", ".join(f"{row.max() / row.mean():.2f}" for row in loads)
        print(f"{name} expert loads, max / mean per MoE layer: {skew}")
    print(f"CAEE: {caee}")
    for device in device_models:
        print(
            f"{device.name}: {device.source}; fixed {device.fixed_s * 1e6:.1f} us, pair {device.pair_s * 1e6:.3f} us,"
            f" expert {device.activation_s * 1e6:.1f} us, token {device.comm_token_s * 1e6:.3f} us"
        )
    print("\n".join(table_rows(results)))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
