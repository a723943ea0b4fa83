"""Meshes, logical-axis sharding rules and expert parallelism (`jax.shard_map`)."""
