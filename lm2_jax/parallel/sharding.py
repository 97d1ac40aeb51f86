"""One mesh with axes (data, fsdp, tensor); logical axis names map to mesh axes by rules.

Rules are tried in order and a mesh axis is used at most once per array, so activations
("batch", "length", "embed") shard batch over data x fsdp and keep embed whole, while parameters
("embed", "mlp") shard embed over fsdp (FSDP) and mlp over tensor (Megatron-style tensor parallelism).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm2_jax.model.config import as_dict, check

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("mem_slots", None),
    ("mem_banks", "tensor"),
)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) sized by `config.mesh`; one size may be -1 (fills the rest)."""
  sizes = as_dict(mesh_config, "mesh")
  devices = list(jax.devices() if devices is None else devices)
  for name in sizes:
    check(name in MESH_AXES, f"mesh.{name}", sizes[name], f"unknown mesh axis; the axes are {MESH_AXES}")
  shape = [sizes.get(a, 1) for a in MESH_AXES]
  for a, s in zip(MESH_AXES, shape):
    check(isinstance(s, int) and (s > 0 or s == -1), f"mesh.{a}", s, "must be a positive integer or -1")
  check(shape.count(-1) <= 1, "mesh", sizes, "at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    check(len(devices) % known == 0, "mesh", sizes, f"the fixed axes ({known}) must divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  check(int(np.prod(shape)) == len(devices), "mesh", sizes,
        f"the axis sizes multiply to {int(np.prod(shape))} but there are {len(devices)} devices; set one axis to -1")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """A pytree of logical axis names (PartitionSpecs or tuples) -> the NamedShardings these rules give."""
  def one(axes):
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))
  def is_axes(x):  # a PartitionSpec or a plain tuple of names (not an optimizer state's namedtuple)
    return isinstance(x, PartitionSpec) or (type(x) is tuple and all(e is None or isinstance(e, str) for e in x))
  return jax.tree.map(one, axes_tree, is_leaf=is_axes)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
  """Within this context, the model's logical constraints on activations shard over `mesh` by `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
