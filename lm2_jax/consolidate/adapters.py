"""Low-rank adapters on chosen layers, merged into the parameters after training.

An adapted kernel W [d0, d1, ...] (a dense kernel: input axis first) is trained as the matrix [d0, d1 * ...]:

    W' = W + (alpha / rank) * reshape(A @ B),      A [d0, rank] ~ N(0, 1/d0),  B [rank, d1 * ...] = 0

so training starts from W exactly. A kernel of a scanned layer group (`decoder/layers_{a}_{b}`, leading layers
axis) gets one A, B per layer, and layers outside the chosen ones keep W bit for bit (`jnp.where`, not + 0).
Which kernels: those of the decoder layers in `layers` ('all' or indices) whose path names a module in `targets`
(e.g. 'attn,mlp': every kernel under attn/ and mlp/). Every other parameter is not trained and stays as it was.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import check
from lm2_jax.model.memory import parse_layers

_LAYER = re.compile(r"^layer_(\d+)$")
_GROUP = re.compile(r"^layers_(\d+)_(\d+)$")


def _keys(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def adapted_layers(path, num_layers: int, layers: tuple[int, ...]) -> np.ndarray | None:
  """For a kernel's path: the mask of its chosen layers ([1] for an unscanned layer, [group size] for a scanned
  group), or None when the path is not a decoder layer's."""
  keys = _keys(path)
  for k in keys:
    if m := _LAYER.match(k):
      return np.array([int(m.group(1)) in layers])
    if m := _GROUP.match(k):
      return np.array([i in layers for i in range(int(m.group(1)), int(m.group(2)))])
  return None


def targets_of(params, num_layers: int, layers_spec, targets: str):
  """{path string: layer mask} of the kernels to adapt (module docstring); refuses a choice that adapts nothing."""
  layers = parse_layers(layers_spec, num_layers)
  names = [t.strip() for t in targets.split(",") if t.strip()]
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = _keys(path)
    mask = adapted_layers(path, num_layers, layers)
    if keys[-1] != "kernel" or mask is None or not mask.any() or not any(n in keys for n in names):
      continue
    out[jax.tree_util.keystr(path)] = mask
  check(bool(out), "consolidate.adapters.targets", targets,
        f"adapts no kernel of layers {layers_spec!r}; name modules of the decoder layers, e.g. 'attn,mlp'")
  return out


def _as_layers(path, w):
  """A kernel leaf as [n, d0, rest]: n = the layers of a scanned group (leading axis), else 1."""
  grouped = any(_GROUP.match(k) for k in _keys(path))
  one = w.shape[1:] if grouped else w.shape
  return w.reshape(w.shape[0] if grouped else 1, one[0], int(np.prod(one[1:])))


def init(params, chosen: dict, rank: int, key) -> dict:
  """{path: (A, B)}: A [n, d0, rank] random, B [n, rank, rest] zeros (n: see `_as_layers`)."""
  out = {}
  for i, (path, w) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    name = jax.tree_util.keystr(path)
    if name in chosen:
      n, d0, rest = _as_layers(path, w).shape
      a = jax.random.normal(jax.random.fold_in(key, i), (n, d0, rank), jnp.float32) / np.sqrt(d0)
      out[name] = (a, jnp.zeros((n, rank, rest), jnp.float32))
  return out


def merge(params, adapters: dict, chosen: dict, rank: int, alpha: float):
  """The parameters with every adapter folded in: W + (alpha / rank) A @ B on the chosen layers, W elsewhere."""
  def one(path, w):
    name = jax.tree_util.keystr(path)
    if name not in adapters:
      return w
    a, b = adapters[name]
    w_n = _as_layers(path, w)
    new = w_n + ((alpha / rank) * jnp.einsum("nir,nro->nio", a, b)).astype(w.dtype)
    keep = jnp.asarray(chosen[name]).reshape(-1, 1, 1)
    return jnp.where(keep, new, w_n).reshape(w.shape)
  return jax.tree_util.tree_map_with_path(one, params)
