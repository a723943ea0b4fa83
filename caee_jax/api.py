"""The notebook-facing entry points: `load` a checkpoint, `init_random` a preset, call the model."""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from caee_jax.config import ModelConfig, preset
from caee_jax.model.execution import Execution
from caee_jax.model.layers import random_state
from caee_jax.model.transformer import DeepseekV3
from caee_jax.offload.cache import ExpertCache, Offload
from caee_jax.offload.disk_store import DiskStore
from caee_jax.offload.store import HostStore, without_routed_experts
from caee_jax.parallel import eplb_plan
from caee_jax.parallel.eplb import Placement
from caee_jax.parallel.expert_parallel import expert_shards
from caee_jax.parallel.mesh import make_mesh
from caee_jax.parallel.placement import batch_sharding, mesh_context, padded_batch, place_state, to_mesh
from caee_jax.routing.backend import ExpertBackend
from caee_jax.routing.storage import Storage
from caee_jax.runtime import steps
from caee_jax.runtime.tokenizer import Tokenizer
from caee_jax.weights.hf_loader import load_hf_model
from caee_jax.weights.orbax_checkpoint import is_converted, read_metadata, restore_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "caee-small")


def _dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def _execution(execution: Execution | ExpertBackend | str) -> Execution:
    return execution if isinstance(execution, Execution) else Execution(execution)


def _mesh(mesh) -> Mesh | None:
    return mesh if mesh is None or isinstance(mesh, Mesh) else make_mesh(mesh)


class Model:
    """A loaded model: `m(tokens)` gives logits; `m.config`, `m.tokenizer`, `m.module` (the NNX module).

    The module is split once into a static graph definition and a state of arrays; jitted functions
    take both, so parameters are arguments, never constants baked into compiled code.
    execution: an `Execution` (the static plan of the MoE layers), or just an expert backend
    (`ExpertBackend` or its name). mesh: a `Mesh` (or spec such as
    "data=2,expert=4", see `parallel/mesh.py`) to shard the parameters over; calls then run on it.
    placement: an EPLB `Placement` (`parallel/eplb.py`) made for this model and the mesh's expert shards,
    or the path of one saved by `parallel/eplb_plan.py`: the routed experts are held as its physical
    slots, hot experts replicated (`parallel/replicas.py`); the results equal the unplaced model's.
    None: one slot per expert.
    """

    def __init__(
        self,
        module: DeepseekV3,
        tokenizer: Tokenizer | None = None,
        execution: Execution | ExpertBackend | str = "loop",
        mesh: Mesh | str | None = None,
        offload: Offload | None = None,
        placement: Placement | str | os.PathLike | None = None,
    ):
        self.module = module
        self.config: ModelConfig = module.config
        self.tokenizer = tokenizer
        self.execution = _execution(execution)
        self.mesh = _mesh(mesh)
        if module.moe_layers is not None:
            module.moe_layers.ffn.check_scales("moe_layers.ffn")
        self._check_table_storage()
        if module.expert_storage is Storage.FP8 and not self.execution.backend.runs_fp8:
            raise ValueError(
                f"backend {self.execution.backend.value!r} cannot run fp8-stored experts (block scales); use 'loop' "
                "or 'pallas', or store the experts as f32/bf16"
            )
        if placement is not None:
            if offload is not None:
                raise ValueError("offloaded experts have no replicas: give an EPLB placement or offload, not both")
            shards = 1 if self.mesh is None else expert_shards(self.mesh)
            if isinstance(placement, str | os.PathLike):
                placement = eplb_plan.read(os.fspath(placement), self.config, shards)
            module.set_placement(placement, shards)
        self.placement: Placement | None = placement
        self.graphdef, self.state = nnx.split(module)
        if self.mesh is not None:
            self.state = place_state(self.state, self.mesh)
        self.expert_cache: ExpertCache | None = None
        if offload is not None:
            self._offload(offload)

    def _check_table_storage(self) -> None:
        """Warns when the cost table was calibrated for routed experts stored otherwise than this model's
        (its `weights` field): table selection refuses that unless told to use the table anyway, so it
        arrives here only by that override or from a table chosen without the model's storage."""
        table = self.execution.cost_table
        if table is None or self.module.moe_layers is None:
            return
        here = Storage.of(self.weights, self.dtype)
        if table.signature.weights != here:
            warnings.warn(
                f"the cost table was calibrated with routed experts stored as weights={table.signature.weights!r}, "
                f"this model holds them as {here.value!r}: its expert costs price other bytes (select the table "
                "with weights=, or calibrate with launch/calibrate.py --weights)",
                stacklevel=3,
            )

    def _offload(self, offload: Offload) -> None:
        """Moves the routed experts into an expert store behind a device cache (`offload/`)."""
        if self.mesh is not None:
            raise ValueError("offloaded experts run on one device for now; load without a mesh")
        if self.weights is Storage.FP8:
            raise ValueError("offloaded experts are stored as f32 or bf16; this model holds them as fp8")
        if offload.store == "disk":
            store = DiskStore(offload.directory, self.config, offload.dtype or self.weights.dtype)
        else:
            store = HostStore.from_state(self.config, self.state)
        manager = offload.manager(store, self.execution.cost_table)
        self.execution = dataclasses.replace(self.execution, offload=manager)
        self.state = without_routed_experts(self.state)
        self.module = nnx.merge(self.graphdef, self.state)
        self.expert_cache = manager.empty_cache()

    def set_expert_means(self, means) -> None:
        """Sets calibrated mean expert outputs [L_moe, E, D] for `mean` compensation (usually through
        `caee_jax.caee.expert_means.load_means`); on a mesh they are placed like every variable."""
        module = nnx.merge(self.graphdef, self.state)
        module.set_expert_means(means)
        self.module = module
        self.graphdef, self.state = nnx.split(module)
        if self.mesh is not None:
            self.state = place_state(self.state, self.mesh)

    def set_importance(self, expert_scale, layer_sensitivity) -> None:
        """Sets CAEE's calibrated importance, [L_moe, E] and [L_moe] (usually through
        `caee_jax.caee.importance.load_importance`); on a mesh it is placed like every variable."""
        module = nnx.merge(self.graphdef, self.state)
        module.set_importance(expert_scale, layer_sensitivity)
        self.module = module
        self.graphdef, self.state = nnx.split(module)
        if self.mesh is not None:
            self.state = place_state(self.state, self.mesh)

    @property
    def dtype(self):
        """The compute dtype (and that of every parameter but the routed experts)."""
        return self.module.embed.embedding.dtype

    @property
    def weights(self) -> Storage | None:
        """How the routed experts are stored (`routing/storage.py`); None without MoE layers."""
        return self.module.expert_storage

    def text_ids(self, text: str) -> np.ndarray:
        """A text as one token stream [M] int64: the tokenizer's ids, or, for a model without one (a
        random-weight preset), its UTF-8 bytes modulo the vocabulary."""
        ids = np.asarray(self.tokenizer.encode(text) if self.tokenizer else list(text.encode()), np.int64)
        return ids % self.config.vocab_size

    def __call__(self, tokens) -> jax.Array:
        """int token ids [B, T] -> full-sequence logits [B, T, V] float32."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [B, T] array, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        vocab = self.config.vocab_size
        if tokens.min() < 0 or tokens.max() >= vocab:
            bad = tokens[(tokens < 0) | (tokens >= vocab)][0]
            raise ValueError(f"token id {bad} out of range [0, {vocab})")
        limit = self.config.max_position_embeddings
        if tokens.shape[1] > limit:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_position_embeddings {limit}")
        # A batch that does not split over the mesh gets dummy rows (copies of row 0), left out of the result.
        batch = tokens.shape[0]
        rows = padded_batch(self.mesh, batch)
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - batch, axis=0)]).astype(np.int32)
        valid = np.arange(rows) < batch
        with mesh_context(self.mesh):
            if self.mesh is not None:
                tokens, valid = (to_mesh(a, batch_sharding(self.mesh, a.ndim)) for a in (tokens, valid))
            logits, self.expert_cache = steps.logits(
                self.graphdef, self.state, jnp.asarray(tokens), self.expert_cache, valid, execution=self.execution
            )
            return logits if rows == batch else logits[:batch]


def load(
    path: str | os.PathLike | None = None,
    *,
    dtype=None,
    weights=None,
    execution="loop",
    mesh=None,
    offload=None,
    placement=None,
) -> Model:
    """Loads a checkpoint directory; without a path, the bundled small model (`docs/MODEL_CARD.md`).

    Either HF format (config.json + *.safetensors, sharded index and DeepSeek's FP8 block-scaled weights
    included; read on the host, then placed) or converted by `python -m checkpoints_tools.convert_hf`
    (Orbax; every parameter restored straight onto its sharding on `mesh`, whatever mesh it was written from).
    dtype: parameter dtype, "float32" (parity) or "bfloat16" (speed); default float32 for HF directories
    and the stored dtype for converted ones. weights: how the routed experts are held, "f32", "bf16" or
    "fp8" (float8_e4m3fn with a float32 scale per 128x128 block: `routing/storage.py`), independently of
    dtype; None keeps them in dtype (an FP8 release's experts load as their bytes and scales, unchanged,
    with "fp8"). execution: as in `Model` (an `Execution` with pruning and
    cost table, or a backend: "loop", the CPU default, "dense", "pallas"). mesh: as in `Model`. offload: an
    `Offload` (experts in a store behind a device cache; `offload/`), or None (every expert on device).
    placement: an EPLB `Placement` or its file, as in `Model` (redundant expert replicas), or None.
    """
    if path is None:
        if not os.path.isdir(BUNDLED_MODEL):
            raise FileNotFoundError(
                f"{BUNDLED_MODEL}: the bundled model is missing; build it with python -m checkpoints_tools.train_small"
            )
        path = BUNDLED_MODEL
    dtype = None if dtype is None else _dtype(dtype)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    config = ModelConfig.from_hf(path)
    mesh = _mesh(mesh)
    if is_converted(path):
        module = restore_model(path, config, dtype or _dtype(read_metadata(path)["dtype"]), mesh)
        if weights is not None and Storage.parse(weights, "weights") is not module.expert_storage:
            module.store_experts(Storage.parse(weights, "weights"))
    else:
        module = load_hf_model(path, config, dtype or jnp.float32, weights)
    return Model(module, Tokenizer.from_dir(path, config.eos_ids), execution, mesh, offload, placement)


def init_random(
    config: ModelConfig | str,
    *,
    seed: int = 0,
    dtype="float32",
    weights=None,
    execution="loop",
    mesh=None,
    offload=None,
    placement=None,
) -> Model:
    """A model with random weights (normal(0, 0.02)) for a config or preset name: tests, demos, benchmarks.
    weights: the routed experts' storage as in `load` (drawn in float32, then stored so: fp8 block-quantised).
    placement: an EPLB `Placement` as in `Model`.

    With a disk `offload` the routed experts come from the store, so they are never drawn (a model whose
    experts exceed host RAM can be built); the other weights then differ from the same seed's resident ones.
    """
    if isinstance(config, str):
        config = preset(config)
    dtype = _dtype(dtype)
    abstract = nnx.eval_shape(lambda: DeepseekV3(config, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    if offload is not None and offload.store == "disk":
        state = without_routed_experts(state)
    module = nnx.merge(graphdef, random_state(state, seed))
    if weights is not None:
        module.store_experts(Storage.parse(weights, "weights"))
    return Model(module, None, execution, mesh, offload, placement)
