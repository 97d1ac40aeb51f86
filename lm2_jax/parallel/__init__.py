"""Device mesh, logical-axis rules and shardings (DESIGN section 6)."""

from lm2_jax.parallel.sharding import DEFAULT_RULES, MESH_AXES, logical_shardings, make_mesh, use_mesh

__all__ = ["DEFAULT_RULES", "MESH_AXES", "logical_shardings", "make_mesh", "use_mesh"]
