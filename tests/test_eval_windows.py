"""`decode_eval.compare` knows each predicted token's window, so the accuracy intervals count a window as one
draw."""

from __future__ import annotations

import numpy as np
import pytest

import caee_jax
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.eval import decode_eval
from caee_jax.model.execution import Execution
from caee_jax.stats import clustered_se


def test_window_ids_run_on_across_batches_and_feed_the_clustered_errors():
    model = caee_jax.init_random("tiny", seed=5)
    rng = np.random.default_rng(0)
    candidate = Execution(pruning=PeerRule("topk", 2))
    result = decode_eval.compare(model, candidate, rng.integers(0, 100, (2, 9)).astype(np.int32), prefix=5)
    result = decode_eval.compare(model, candidate, rng.integers(0, 100, (3, 9)).astype(np.int32), 5, result)
    window = np.concatenate(result.window)
    assert result.windows == 5
    np.testing.assert_array_equal(window, [0, 1] * 3 + [2, 3, 4] * 3)  # 3 predicted steps per window
    summary = result.summary()
    rise = np.concatenate(result.nll) - np.concatenate(result.nll_base)
    assert summary["nll_diff_se_windows"] == pytest.approx(clustered_se(rise, window))
    assert summary["nll_diff_se_windows"] > 0 and summary["top1_diff_se_windows"] >= 0
