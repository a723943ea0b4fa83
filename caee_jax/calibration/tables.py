"""Which cost table a run uses: the signature of a model on a mesh, and the stored table that matches it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.caee.cost_table import DEFAULT_DIR, CostTable, MeshSignature, load_table, table_for
from caee_jax.config import ModelConfig
from caee_jax.parallel import straggler
from caee_jax.parallel.mesh import describe
from caee_jax.routing.backend import ExpertBackend
from caee_jax.routing.storage import Storage


def signature_of(config: ModelConfig, mesh, dtype, backend: ExpertBackend | str, weights=None) -> MeshSignature:
    """The signature of running `config` on `mesh` (None: one device) with this dtype and expert backend,
    the routed experts stored as `weights` (`routing/storage.py`; None: in `dtype`), with this process's local
    cluster slowed as its launcher said (`straggler.condition`)."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    return MeshSignature(
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        num_processes=len({d.process_index for d in devices}),
        mesh=describe(mesh) if mesh is not None else "data=1,expert=1,tensor=1",
        hidden_size=config.hidden_size,
        moe_intermediate_size=config.moe_intermediate_size,
        n_routed_experts=config.n_routed_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        dtype=jnp.dtype(dtype).name,
        backend=ExpertBackend(backend).value,
        weights=Storage.of(weights, dtype).value,
        slowed=straggler.condition(),
    )


def select_table(
    config: ModelConfig,
    mesh,
    dtype,
    backend: ExpertBackend | str,
    path: str | None = None,
    directory: str = DEFAULT_DIR,
    *,
    override: bool = False,
    weights=None,
) -> CostTable:
    """The table at `path` (checked against this setup unless `override`), else the stored table of exactly
    this signature under `directory`; CostTableError says what differs or how to calibrate one. weights: the
    routed experts' storage (None: in `dtype`): a table calibrated for another storage is refused, naming
    the `weights` field."""
    signature = signature_of(config, mesh, dtype, backend, weights)
    return load_table(path, signature, override=override) if path else table_for(signature, directory)
