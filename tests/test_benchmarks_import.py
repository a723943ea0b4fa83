"""Every benchmark script still imports: they share helpers (caee_jax.stats, each other's functions) and are
run by hand, so a renamed helper would otherwise only show when someone next measures."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def test_every_benchmark_script_imports():
    scripts = sorted(name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py"))
    guarded = [s for s in scripts if 'if __name__ == "__main__":' in open(os.path.join(BENCHMARKS, f"{s}.py")).read()]
    assert len(guarded) >= len(scripts) - 1, f"scripts that run on import: {sorted(set(scripts) - set(guarded))}"
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BENCHMARKS, ROOT]), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code, *guarded], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
