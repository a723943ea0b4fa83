"""Rich displays in a notebook: configs, rules, cost tables and generation statistics render as HTML tables
with their values; our NNX modules render with treescope, expert-sharded arrays included."""

from __future__ import annotations

import jax
import treescope
from flax import nnx
from test_pruning import single_device_table

import caee_jax
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.parallel.mesh import make_mesh


def test_config_rule_table_and_generation_render_as_tables():
    config = caee_jax.preset("tiny")
    page = config._repr_html_()
    assert page.startswith("<table") and "n_routed_experts" in page and f">{config.n_routed_experts}<" in page
    assert ">0.65<" in CAEEConfig(theta=0.65)._repr_html_()
    assert "top_p" in PeerRule("top_p", 0.9)._repr_html_()
    model = caee_jax.init_random("tiny")
    table = single_device_table(model)
    page = table._repr_html_()
    assert "costs (µs)" in page and f"{1e6 * table.devices[0].pair_s:.6g}" in page
    page = caee_jax.generate_with_stats(model, [[1, 2, 3]], max_new_tokens=3, stop=[])._repr_html_()
    assert "decode ms/token" in page and "3" in page


def test_modules_render_with_treescope_sharded_arrays_included():
    model = caee_jax.init_random("tiny", mesh=make_mesh("expert=4", jax.devices()[:4]))
    module = nnx.merge(model.graphdef, model.state)
    experts = module.moe_layers.ffn.gate_proj[...]  # [L, E, D, F], E split over the 4 expert shards
    assert experts.sharding.shard_shape(experts.shape)[1] == experts.shape[1] // 4
    text = treescope.render_to_text(module)
    assert "DeepseekV3(" in text and "gate_proj" in text
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        page = treescope.render_to_html(module, compressed=False)  # arrays drawn, with their sharding over devices
    assert "gate_proj" in page
    assert "cpu" in treescope.render_to_html(treescope.render_array_sharding(experts), compressed=False).lower()
