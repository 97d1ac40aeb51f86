"""Memory kinds behind one interface (DESIGN section 4).

A memory kind is a Linen module registered here under its name, with

  Config                      a frozen dataclass with at least `kind` and `layers`, built by `Config.parse`
  init_state(mcfg, batch)     static: a fresh state (pytree of float32 arrays with a batch axis, no layer axis)
  state_axes(mcfg)            static: the logical axis names of each state array (same pytree structure)
  placement                   'layer' (in every layer of `layers`) or 'segment' (around the layer stack)

and the call of its placement (lm2_jax.model.memory.protocol, DESIGN section 4):

  layer    out, new_state = memory(state, h_BLD, docs): `out.residual_BLD`, `out.kv`, `out.stats`,
           `out.losses`; kinds subclass `LayerMemory` (document rules shared) and define `step`
  segment  y_BLD, new_state, stats, losses = memory(state, x_BLD, docs, run_layers), where
           run_layers(x_BXD, docs_X, layer_states) -> (y_BXD, new layer_states); `prefix(state)` (what stands
           before the segment's tokens in cached decoding) and static `positions(mcfg, L)`: the rotary
           positions of the sequence the layers process. Its config's `layers` is () unless the kind also
           keeps a memory in those layers (armt): then `layer_memory` is the module each of them builds
           (`around_layer`: `read(state, x_BLD, docs)` is added to the layer's input and
           `write(state, y_BLD, docs)` takes the layer's output) and static `layer_states(state)` is the
           per-layer part of the state, [layers, B, ...], threaded through them

Adding a kind is one new file here that defines the module and decorates it with `@register("name")`, plus one
import line at the bottom of this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lm2_jax.model.config import as_dict, check
from lm2_jax.model.memory.protocol import Documents, ExtraKV, LayerMemory, MemoryOut, ReadWriteMemory  # noqa: F401

KINDS: dict[str, type] = {}


def register(name: str):
  """Class decorator: makes a memory module available as `config.model.memory.kind = name`."""
  def deco(cls):
    cls.kind = name
    KINDS[name] = cls
    return cls
  return deco


@dataclasses.dataclass(frozen=True)
class NoMemoryConfig:
  """Memory kind 'none': a plain decoder whose attention window is one segment."""
  kind: str = "none"
  layers: tuple[int, ...] = ()


def parse_layers(value: Any, num_layers: int) -> tuple[int, ...]:
  """'all', a comma-separated string ('0,4,8': command-line friendly) or a list of layer indices -> sorted
  tuple of valid, distinct indices."""
  if value == "all":
    return tuple(range(num_layers))
  items = value.split(",") if isinstance(value, str) else value
  try:
    layers = [int(i) for i in items] if isinstance(items, (list, tuple)) else []
  except (TypeError, ValueError):
    layers = []
  ok = len(layers) > 0 and all(0 <= i < num_layers for i in layers) and len(set(layers)) == len(layers)
  check(ok, "model.memory.layers", value,
        f"use 'all', or distinct layer indices in [0, {num_layers}) as a list or a string like '0,2'")
  return tuple(sorted(layers))


def parse_config(cfg: Any, *, num_layers: int, d_model: int):
  """`config.model.memory` -> the kind's frozen config. Fields of other kinds are allowed (and ignored) so that
  switching `kind` from the command line works; a field no kind knows is an error."""
  v = as_dict(cfg, "model.memory")
  kind = v.get("kind", "none")
  check(kind == "none" or kind in KINDS, "model.memory.kind", kind,
        f"unknown memory kind; use one of {['none', *sorted(KINDS)]}")
  known = {"kind", "layers"} | {f.name for c in KINDS.values() for f in dataclasses.fields(c.Config)}
  for name in sorted(v):
    check(name in known, f"model.memory.{name}", v[name],
          f"no memory kind reads this field; known fields are {sorted(known)}")
  if kind == "none":
    return NoMemoryConfig()
  return KINDS[kind].Config.parse(v, num_layers=num_layers, d_model=d_model)


def module_class(mcfg) -> type:
  """The registered module class of a parsed memory config."""
  return KINDS[mcfg.kind]


def layer_class(mcfg) -> type:
  """The module a memory layer builds: the kind itself, or a segment kind's `layer_memory` (armt)."""
  cls = KINDS[mcfg.kind]
  return getattr(cls, "layer_memory", cls)


def stacked(mcfg) -> bool:
  """Whether the state holds one memory per memory layer, stacked on a leading `layers` axis."""
  return placement(mcfg) == "layer" and not getattr(mcfg, "share_across_layers", False)


def placement(mcfg) -> str | None:
  """'layer', 'segment' (the kind wraps the whole layer stack, e.g. 'rmt'), or None for kind 'none'."""
  return KINDS[mcfg.kind].placement if mcfg.kind in KINDS else None


from lm2_jax.model.memory import lm2  # noqa: E402,F401  (registers 'lm2')
from lm2_jax.model.memory import hierarchical  # noqa: E402,F401  (registers 'hierarchical')
from lm2_jax.model.memory import rmt  # noqa: E402,F401  (registers 'rmt')
from lm2_jax.model.memory import memoryllm  # noqa: E402,F401  (registers 'memoryllm' and 'mplus')
from lm2_jax.model.memory import armt  # noqa: E402,F401  (registers 'armt')
from lm2_jax.model.memory import titans  # noqa: E402,F401  (registers 'titans')
from lm2_jax.model.memory import hmt  # noqa: E402,F401  (registers 'hmt')
