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
from jax.experimental import mesh_utils
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
  """A Mesh with axes (data, fsdp, tensor) sized by `config.mesh`, laid out on the devices' topology by
  `mesh_utils` (neighbours on the interconnect share the inner axes). One of data/fsdp/tensor may be -1 (fills
  the rest).

  `mesh.dcn_data` > 1 spreads the data axis over that many granules joined by the data-centre network (TPU
  slices in a multi-slice run; processes, i.e. hosts, elsewhere): data/fsdp/tensor are then the sizes within
  one granule, the mesh's data axis is dcn_data x data, and only data-parallel traffic (the gradient reduction)
  crosses the slower network.
  """
  sizes = dict(as_dict(mesh_config, "mesh"))
  devices = list(jax.devices() if devices is None else devices)
  dcn = sizes.pop("dcn_data", 1)
  for name in sizes:
    check(name in MESH_AXES, f"mesh.{name}", sizes[name],
          f"unknown mesh axis; the axes are {MESH_AXES} (and dcn_data for multi-slice runs)")
  check(isinstance(dcn, int) and dcn >= 1 and len(devices) % dcn == 0, "mesh.dcn_data", dcn,
        f"must be a positive integer dividing the {len(devices)} devices (the number of slices or hosts)")
  per_granule = len(devices) // dcn
  shape = [sizes.get(a, 1) for a in MESH_AXES]
  for a, s in zip(MESH_AXES, shape):
    check(isinstance(s, int) and (s > 0 or s == -1), f"mesh.{a}", s, "must be a positive integer or -1")
  check(shape.count(-1) <= 1, "mesh", sizes, "at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  where = f"{per_granule} devices{' per granule (mesh.dcn_data)' if dcn > 1 else ''}"
  if -1 in shape:
    check(per_granule % known == 0, "mesh", sizes, f"the fixed axes ({known}) must divide the {where}")
    shape[shape.index(-1)] = per_granule // known
  check(int(np.prod(shape)) == per_granule, "mesh", sizes,
        f"the axis sizes multiply to {int(np.prod(shape))} but there are {where}; set one axis to -1")
  if dcn == 1:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    granules = {getattr(d, "slice_index", d.process_index) for d in devices}
    by_process = not hasattr(devices[0], "slice_index") or len(granules) == 1
    count = len({d.process_index for d in devices}) if by_process else len(granules)
    check(count == dcn, "mesh.dcn_data", dcn,
          f"there are {count} {'processes' if by_process else 'slices'}; set mesh.dcn_data to that number (or 1)")
    grid = mesh_utils.create_hybrid_device_mesh(shape, [dcn, 1, 1], devices, process_is_granule=by_process,
                                                allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES)


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
