#!/usr/bin/env bash
# One entry point for a fresh machine with Python 3.11 and pip:
#   bash dev.sh run [launch/run.py args]   set up .venv (runtime deps) and run the main job
#   bash dev.sh test [pytest args]         set up .venv (runtime + test deps) and run the whole test suite
#   bash dev.sh lint                       ruff over the repo, and the package's layering contract
# The virtual environment lives in .venv and is reused; it is re-synced when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

setup() {  # $1: extras ("" or "test")
    local extras="$1" stamp
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    stamp=".venv/.synced-$(sha256sum pyproject.toml | cut -c1-16)-${extras:-base}"
    if [ ! -f "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        # torch==2.13.0 (test extra) comes from the machine's local wheel; installed first so that
        # transformers never pulls a CUDA build from the registry.
        if [ "$extras" = test ]; then .venv/bin/python -m pip install --quiet torch==2.13.0; fi
        .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
        touch "$stamp"
    fi
}

run_tests() {  # the suite on both cores (2 pytest-xdist workers), then the tests that time this machine
    # (marker `timing`) on their own, so that the other worker's load cannot skew what they measure.
    # The untimed part compiles with LLVM's optimisation off: its programs are tiny and mostly compiled
    # once, so compiling is most of its time (a third less with this flag, docs/RESULTS.md); the timing
    # tests measure the code users run, so they keep the default.
    local parallel=0 alone=0
    XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-}" \
        .venv/bin/python -m pytest -n 2 --dist worksteal -m "not timing" "$@" || parallel=$?
    .venv/bin/python -m pytest -m timing "$@" || alone=$?
    if [ "$parallel" -eq 5 ] && [ "$alone" -eq 5 ]; then return 5; fi  # 5: no test selected
    [ "$parallel" -eq 5 ] && parallel=0
    [ "$alone" -eq 5 ] && alone=0
    [ "$parallel" -ne 0 ] && return "$parallel"
    return "$alone"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    run)  setup ""; exec .venv/bin/python launch/run.py "$@" ;;
    test) setup test; run_tests "$@" ;;
    lint) setup test; .venv/bin/ruff check . && .venv/bin/ruff format --check . && exec .venv/bin/lint-imports ;;
    *) echo "usage: bash dev.sh run|test|lint [args]" >&2; exit 2 ;;
esac
