"""The converted-checkpoint format: one Orbax item per layer, restored straight into mesh shardings.

A directory written by `python -m checkpoints_tools.convert_hf` holds:

    caee_checkpoint.json   format, version, parameter dtype, unit list, MTP module count, source summary
    config.json            the source's, without `quantization_config` (weights are no longer FP8)
    tokenizer*.json ...    copied from the source
    top/                   embed.embedding [V, D], final_norm.weight [D], lm_head [D, V] (when untied)
    dense_layers/NNN/      one DecoderLayer's parameters, no layer axis: stack index NNN = HF layer NNN
    moe_layers/NNN/        stack index NNN = HF layer first_k_dense_replace + NNN (experts [E, ...] stacked)
    mtp/NNN/               MTP module NNN (`model/mtp.py`), HF layer num_hidden_layers + NNN

Each unit is an Orbax PyTree checkpoint (OCDBT, zarr3, uncompressed) of nested dicts keyed by the
parameter's path in the model state. One item per layer lets the converter stream (it holds one
layer at a time) and resume (a finished layer is a finished item). Restoring never materialises the
model twice: every stacked parameter is first allocated on its target sharding, then each layer's
item is restored with the per-layer slice of that sharding (each device reads only its own part) and
written into the stack by a jitted update that donates the stack, so the peak is the model plus one
layer. Every process runs the same sequence of collective restores (multi-process safe).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from caee_jax.config import ModelConfig
from caee_jax.files import fsync
from caee_jax.model.mtp import MTPLayer
from caee_jax.model.transformer import DeepseekV3
from caee_jax.parallel.rules import state_shardings
from caee_jax.routing.storage import Storage
from caee_jax.weights.hf_layout import (
    Recipe,
    fp8_expert_scale_recipes,
    layer_recipes,
    mtp_recipes,
    stacks,
    top_recipes,
)
from caee_jax.weights.hf_loader import abstract_model
from caee_jax.weights.safetensors_io import CheckpointError

FORMAT = "caee-orbax"
VERSION = 1
METADATA = "caee_checkpoint.json"

Path = tuple[str, ...]


class Unit:
    """One Orbax item: `name` (its directory, e.g. "moe_layers/007"), the recipes building its parameters
    from HF tensors (targets relative to the item) and each parameter's abstract value (shape, dtype)."""

    def __init__(self, name: str, recipes: list[Recipe], abstract: dict[Path, jax.ShapeDtypeStruct]):
        built = {recipe.target for recipe in recipes}
        if built != set(abstract):
            raise AssertionError(f"{name}: recipes and model parameters differ at {sorted(built ^ set(abstract))}")
        self.name, self.recipes, self.abstract = name, recipes, abstract


def _flat_abstract(module: nnx.Module) -> dict[Path, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(module)))


def _abstract_mtp(config: ModelConfig, dtype) -> MTPLayer:
    return nnx.eval_shape(lambda: MTPLayer(config, dtype, rngs=nnx.Rngs(0)))


def _shape_dtype(variable: nnx.Variable, drop_layer_axis: bool = False) -> jax.ShapeDtypeStruct:
    shape = variable.shape[1:] if drop_layer_axis else variable.shape
    return jax.ShapeDtypeStruct(shape, variable.dtype)


def units(config: ModelConfig, dtype, mtp_modules: int, weights: Storage | None = None) -> list[Unit]:
    """Every item of a converted checkpoint, in writing order: top, dense layers, MoE layers, MTP modules.
    weights: the routed experts' storage (fp8: the MoE items hold float8 experts and their block scales)."""
    flat = _flat_abstract(abstract_model(config, dtype, weights))
    top = top_recipes(config)
    out = [Unit("top", top, {r.target: _shape_dtype(flat[r.target]) for r in top})]
    for stack, layer_ids in stacks(config):
        for index, layer in enumerate(layer_ids):
            recipes = layer_recipes(config, layer)
            if stack == "moe_layers" and weights is Storage.FP8:
                recipes += fp8_expert_scale_recipes(config, layer)
            abstract = {r.target: _shape_dtype(flat[(stack, *r.target)], drop_layer_axis=True) for r in recipes}
            out.append(Unit(f"{stack}/{index:03d}", recipes, abstract))
    mtp = _flat_abstract(_abstract_mtp(config, dtype)) if mtp_modules else {}
    for k in range(mtp_modules):
        recipes = mtp_recipes(config, k)
        out.append(Unit(f"mtp/{k:03d}", recipes, {r.target: _shape_dtype(mtp[r.target]) for r in recipes}))
    return out


@functools.cache
def _checkpointer(saving: bool = False) -> ocp.Checkpointer:
    """Saving writes numpy arrays without Orbax's default defensive copy (which doubled the converter's
    peak memory); the caller never modifies them. Restoring uses Orbax's standard handlers."""
    options = {}
    if saving:
        no_copy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        options["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry((np.ndarray, no_copy))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False, **options))


def save_unit(path: str, values: dict[Path, np.ndarray]) -> None:
    """Writes one item (a new directory `path`) and fsyncs it, so it survives a crash once this returns."""
    _checkpointer(saving=True).save(path, args=ocp.args.PyTreeSave(traverse_util.unflatten_dict(values)))
    for root, _, files in os.walk(path):
        for name in files:
            fsync(os.path.join(root, name))
        fsync(root)
    fsync(os.path.dirname(path))


def restore_unit(path: str, targets: dict[Path, jax.ShapeDtypeStruct], partial: bool = False) -> dict[Path, jax.Array]:
    """The item at `path` as global arrays with each target's shape, dtype and sharding (each process reads
    only its devices' shards). partial: restore only the targets' parameters (the item may hold more)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: missing item (incomplete or damaged conversion)")
    item = traverse_util.unflatten_dict(targets)
    args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), item)
    restored = _checkpointer().restore(path, args=ocp.args.PyTreeRestore(item, args, partial_restore=partial))
    return traverse_util.flatten_dict(restored)


def check_unit(path: str, abstract: dict[Path, jax.ShapeDtypeStruct]) -> None:
    """Raises CheckpointError naming the item and parameter unless the item at `path` holds exactly the
    parameters of `abstract`, with their shapes and dtypes. Only metadata is read, so an item cut short, or
    one whose data files another process removed, fails here cheaply: every unit is checked before a
    conversion is published."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: missing item (incomplete or damaged conversion)")
    stored = _stored_parameters(path)
    for target, expected in abstract.items():
        name, wanted = ".".join(target), (np.dtype(expected.dtype).name, expected.shape)
        if name not in stored:
            raise CheckpointError(f"{path}: parameter {name} is missing")
        if stored[name] != wanted:
            raise CheckpointError(f"{path}: parameter {name} is {stored[name]}, expected {wanted}")
    extra = sorted(name for name in stored if tuple(name.split(".")) not in abstract)
    if extra:
        raise CheckpointError(f"{path}: unexpected parameter(s) {', '.join(extra)}")


def _stored_parameters(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parameter name -> (dtype name, shape) from the zarr metadata in the item's OCDBT database. Read with
    tensorstore synchronously: Orbax's own metadata call floods stderr with asyncio tracebacks on a damaged
    item. Reading the database's index fails when its data files are gone."""
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(path)}"}).result()
        stored = {}
        for key in store.list().result():
            if key.endswith(b"/zarr.json"):
                zarr = json.loads(store.read(key).result().value)
                stored[key.decode().removesuffix("/zarr.json")] = (zarr["data_type"], tuple(zarr["shape"]))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: damaged Orbax item ({str(e).splitlines()[0]})") from None
    return stored


def stored_weights(directory: str) -> Storage | None:
    """The routed experts' storage of a converted checkpoint: fp8 when converted with --keep-fp8, else None
    (the checkpoint's dtype)."""
    weights = read_metadata(directory).get("weights")
    return None if weights is None else Storage.parse(weights, f"{directory}: weights")


def is_converted(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, METADATA))


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} checkpoint")
    return metadata


def _targets(state: nnx.State, mesh: Mesh | None) -> dict[Path, jax.ShapeDtypeStruct]:
    """Per parameter path: shape, dtype and the sharding it is restored to (one device without a mesh)."""
    flat = dict(nnx.to_flat_state(state))
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for p, v in flat.items()}
    shardings = dict(nnx.to_flat_state(state_shardings(state, mesh)))
    return {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p].get_value()) for p, v in flat.items()}


def _layer_target(stacked: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """One layer of a stacked parameter: shape and sharding without the leading layer axis."""
    sharding = stacked.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=sharding)


def _allocate(targets: dict[Path, jax.ShapeDtypeStruct]) -> dict[Path, jax.Array]:
    """Zeros with each target's sharding, created in place on the devices (no host copy)."""
    make = jax.jit(
        lambda: {p: jnp.zeros(t.shape, t.dtype) for p, t in targets.items()},
        out_shardings={p: t.sharding for p, t in targets.items()},
    )
    return make()


def _put_layer(stack: dict, layer: dict, index: jax.Array) -> dict:
    """stack[p][index] = layer[p] for every parameter, moved as unsigned integers of the same width: XLA:CPU
    updates a narrow float array by widening all of it (float8 in software: an FP8 stack took minutes)."""

    def put(s, new):
        bits, move = np.dtype(f"uint{8 * s.dtype.itemsize}"), jax.lax.bitcast_convert_type
        updated = jax.lax.dynamic_update_index_in_dim(move(s, bits), move(new.astype(s.dtype), bits), index, 0)
        return move(updated, s.dtype)

    return {p: put(s, layer[p]) for p, s in stack.items()}


def restore_model(directory: str, config: ModelConfig, dtype, mesh: Mesh | None = None) -> DeepseekV3:
    """The main model from a converted checkpoint, every parameter on its target sharding (`rules.py`);
    routed experts in the checkpoint's storage (metadata "weights", fp8 for `convert_hf --keep-fp8`)."""
    graphdef, state = nnx.split(abstract_model(config, dtype, stored_weights(directory)))
    targets = _targets(state, mesh)
    stack_names = {stack for stack, _ in stacks(config)}
    values = restore_unit(os.path.join(directory, "top"), {p: t for p, t in targets.items() if p[0] not in stack_names})
    for stack, layer_ids in stacks(config):
        if not layer_ids:
            continue
        stacked = {p[1:]: t for p, t in targets.items() if p[0] == stack}
        per_layer = {p: _layer_target(t) for p, t in stacked.items()}
        buffers = _allocate(stacked)
        # Donating the stack lets XLA update it in place: one copy of it exists at any time.
        put = jax.jit(_put_layer, donate_argnums=0, out_shardings={p: t.sharding for p, t in stacked.items()})
        for index in range(len(layer_ids)):
            layer = restore_unit(os.path.join(directory, f"{stack}/{index:03d}"), per_layer)
            buffers = jax.block_until_ready(put(buffers, layer, jnp.int32(index)))
            del layer  # freed before the next layer is read: at most one layer in flight
        values.update({(stack, *p): v for p, v in buffers.items()})
    if set(values) != set(targets):
        raise CheckpointError(f"{directory}: parameters {sorted(set(targets) ^ set(values))} missing or extra")
    flat = dict(nnx.to_flat_state(state))
    for path, value in values.items():
        flat[path].set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class ExpertLayers:
    """One routed-expert stack ("gate", "up" or "down") of a converted checkpoint, [L, E, ...] with `shape`
    and `dtype` (the stored one, or `dtype`), read one MoE layer at a time: `stack[layer]` restores that
    layer's [E, ...] array from its item as numpy. Lets the expert-store writer stream a checkpoint larger
    than memory."""

    def __init__(self, directory: str, config: ModelConfig, name: str, dtype=None):
        if stored_weights(directory) is Storage.FP8:
            raise CheckpointError(
                f"{directory}: FP8 routed experts (--keep-fp8) cannot go to an expert store (f32/bf16)"
            )
        stored = jnp.dtype(read_metadata(directory)["dtype"])
        stacked = _flat_abstract(abstract_model(config, stored))[("moe_layers", "ffn", f"{name}_proj")]
        self.directory, self.shape, self.dtype = directory, tuple(stacked.shape), jnp.dtype(dtype or stored)
        device = SingleDeviceSharding(jax.devices()[0])
        self._target = {("ffn", f"{name}_proj"): jax.ShapeDtypeStruct(self.shape[1:], self.dtype, sharding=device)}

    def __getitem__(self, layer: int) -> np.ndarray:
        path = os.path.join(self.directory, f"moe_layers/{layer:03d}")
        (value,) = restore_unit(path, self._target, partial=True).values()
        return np.asarray(value)


def load_mtp(directory: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> list[MTPLayer]:
    """The MTP modules of a converted checkpoint (empty when it has none), on `mesh` when given.

    dtype: parameter dtype (default: the checkpoint's)."""
    directory = os.fspath(directory)
    metadata = read_metadata(directory)
    config = ModelConfig.from_hf(directory)
    graphdef, state = nnx.split(_abstract_mtp(config, dtype or metadata["dtype"]))
    targets = _targets(state, mesh)
    modules = []
    for k in range(metadata["mtp_modules"]):
        values = restore_unit(os.path.join(directory, f"mtp/{k:03d}"), targets)
        flat = dict(nnx.to_flat_state(state))
        for path, value in values.items():
            flat[path] = flat[path].replace(value)
        modules.append(nnx.merge(graphdef, nnx.from_flat_state(flat)))
    return modules
