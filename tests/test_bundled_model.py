"""The bundled small model: loads by default, matches its model card, and its tokenizer round-trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import caee_jax
from caee_jax.api import BUNDLED_MODEL
from caee_jax.eval.scoring import score_tokens

pytestmark = pytest.mark.skipif(not os.path.isdir(BUNDLED_MODEL), reason="bundled model not built")


@pytest.fixture(scope="module")
def bundled():
    return caee_jax.load()


def card() -> dict:
    with open(os.path.join(BUNDLED_MODEL, "model_card.json")) as f:
        return json.load(f)


def test_loads_by_default_with_its_tokenizer(bundled):
    assert bundled.tokenizer is not None
    assert bundled.config.n_routed_experts >= 32 and bundled.config.num_experts_per_tok >= 4
    assert bundled.config.num_moe_layers >= 3
    assert bundled.config.hidden_size >= 256 and bundled.config.moe_intermediate_size >= 256
    size = sum(os.path.getsize(os.path.join(BUNDLED_MODEL, f)) for f in os.listdir(BUNDLED_MODEL))
    assert size <= 64 * 2**20


def test_heldout_slice_perplexity_matches_the_model_card(bundled):
    """Re-scores the card's slice; float32 on CPU is deterministic up to reduction order."""
    expected = card()["slice"]
    with open(os.path.join(BUNDLED_MODEL, "heldout.txt")) as f:
        ids = np.array(bundled.tokenizer.encode(f.read()))[: expected["tokens"] + 1]
    measured = score_tokens(bundled, ids, window=expected["window"], batch=4, progress=False).perplexity
    assert measured == pytest.approx(expected["ppl"], rel=1e-3)
    assert measured < card()["bigram"]["ppl"], "the model must beat the bigram baseline"


def test_tokenizer_round_trips(bundled):
    with open(os.path.join(BUNDLED_MODEL, "heldout.txt")) as f:
        text = f.read()[:5000]
    ids = bundled.tokenizer.encode(text)
    assert ids[0] == bundled.config.bos_token_id
    assert bundled.tokenizer.decode(ids) == text
    assert max(ids) < bundled.config.vocab_size


def test_completes_python(bundled):
    out = caee_jax.generate(bundled, ["import os\n\ndef "], max_new_tokens=16)
    text = bundled.tokenizer.decode(out[0])
    assert len(out[0]) > 0 and text.strip()
