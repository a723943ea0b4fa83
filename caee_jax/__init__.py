"""caee-jax: DeepSeek-V3/R1 inference in JAX with Cost-Aware Expert Execution."""

from caee_jax.api import Model, init_random, load
from caee_jax.config import ConfigError, ModelConfig, YarnScaling, preset
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.runtime.generate import Generation, chat_prompt, generate, generate_with_stats, stream
from caee_jax.weights.orbax_checkpoint import load_mtp

__all__ = [
    "ConfigError",
    "ExpertBackend",
    "ExpertWeights",
    "Generation",
    "Model",
    "ModelConfig",
    "YarnScaling",
    "chat_prompt",
    "generate",
    "generate_with_stats",
    "init_random",
    "load",
    "load_mtp",
    "preset",
    "run_experts",
    "stream",
]
