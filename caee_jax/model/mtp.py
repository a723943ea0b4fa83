"""The parameters of one DeepSeek-V3 multi-token-prediction (MTP) module.

The release keeps `num_nextn_predict_layers` MTP modules after the main layers (HF layer index
num_hidden_layers + k). Module k predicts one token further ahead: h' = layer(eh_proj([enorm(embed(t)),
hnorm(h)])), logits = head_norm(h') @ head, with the concatenation in that order ([2D] = embedding half
first). caee_jax does not run MTP (no speculative decoding yet); this module gives the converted
parameters their shapes and logical axes, so `caee_jax.load_mtp` can restore them onto a mesh.
"""

from __future__ import annotations

from flax import nnx

from caee_jax.config import ModelConfig
from caee_jax.model.layers import Embed, RMSNorm, param
from caee_jax.model.transformer import DecoderLayer


class MTPLayer(nnx.Module):
    """embed [V, D], enorm/hnorm/head_norm [D], eh_proj [2D, D], one decoder layer, head [D, V]. The
    embedding and head are the release's copies (DeepSeek shares them with the main model)."""

    def __init__(self, config: ModelConfig, dtype, *, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.embed = Embed(config.vocab_size, d, dtype, rngs=rngs)
        self.enorm = RMSNorm(d, eps, dtype, rngs=rngs)
        self.hnorm = RMSNorm(d, eps, dtype, rngs=rngs)
        self.eh_proj = param(rngs, (2 * d, d), ("embed", "embed"), dtype)
        self.layer = DecoderLayer(config, dtype, moe=True, rngs=rngs)  # its index is past first_k_dense_replace
        self.head_norm = RMSNorm(d, eps, dtype, rngs=rngs)
        self.head = param(rngs, (d, config.vocab_size), ("embed", "vocab"), dtype)
