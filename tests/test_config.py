"""Bad configuration fails early, and the error names the field, the value and the fix."""

import os

import jax.numpy as jnp
import pytest

from helpers import build, tiny_config
from lm2_jax.model import ConfigError, LM2Model, count_params

CASES = [
    # (override, field in the message, value in the message, words of the fix)
    (dict(num_heads=5), "model.num_heads=5", "must divide d_model=32"),
    (dict(num_kv_heads=3), "model.num_kv_heads=3", "must divide num_heads=4"),
    (dict(num_heads=32), "model.num_heads=32", "must be even"),
    (dict(d_model=0), "model.d_model=0", "positive integer"),
    (dict(bptt_segments=-1), "model.bptt_segments=-1", ">= 0"),
    (dict(dtype="float8"), "model.dtype='float8'", "use one of"),
    (dict(remat_policy="some"), "model.remat_policy='some'", "use one of"),
    (dict(segment_unroll=0), "model.segment_unroll=0", "integer >= 1"),
    (dict(memory_kind="lm3"), "model.memory.kind='lm3'", "unknown memory kind; use one of ['none', 'armt', "),
    (dict(memory_layers="0,7"), "model.memory.layers='0,7'", "layer indices in [0, 2)"),
    (dict(memory_layers="0,0"), "model.memory.layers='0,0'", "distinct"),
    (dict(memory_num_heads=3), "model.memory.slot_dim=32", "multiple of memory.num_heads=3"),
    (dict(memory_num_slots=0), "model.memory.num_slots=0", "positive integer"),
    (dict(memory_read_decay=1.5), "model.memory.read_decay=1.5", "[0, 1]"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "model.rope_scaling.rope_type='yarn'",
     "'default', 'llama3'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "model.rope_scaling.high_freq_factor", "missing"),
]


@pytest.mark.parametrize("override,field,fix", CASES, ids=[c[1] for c in CASES])
def test_bad_field_is_named(override, field, fix):
  config = tiny_config("lm2")
  for k, v in override.items():
    (config.memory if k.startswith("memory_") else config)[k.removeprefix("memory_")] = v
  with pytest.raises(ConfigError) as e:
    LM2Model(config)
  assert field in str(e.value) and fix in str(e.value), str(e.value)


def test_unknown_fields_are_rejected():
  config = tiny_config("lm2").to_dict()
  config["num_head"] = 4
  with pytest.raises(ConfigError, match=r"model.num_head=4: unknown field"):
    LM2Model(config)
  config = tiny_config("lm2").to_dict()
  config["memory"]["num_slot"] = 4
  with pytest.raises(ConfigError, match=r"model.memory.num_slot=4: no memory kind reads this field"):
    LM2Model(config)


def test_length_not_a_multiple_of_segment_len():
  model, params = build(tiny_config("lm2"))
  with pytest.raises(ConfigError, match=r"segment_len=8: the input has T=20 tokens.*multiple of 8"):
    model.apply({"params": params}, jnp.zeros((1, 20), jnp.int32))
  model.apply({"params": params}, jnp.zeros((1, 5), jnp.int32))  # shorter than a segment: one segment


def test_fields_of_other_memory_kinds_are_allowed():
  """Switching kind on the command line leaves the other kind's fields in place; 'none' ignores them."""
  assert count_params(LM2Model(tiny_config("none", memory_num_slots=99)))["memory"] == 0


def test_rmt_memory_is_model_level():
  with pytest.raises(ConfigError, match=r"model.memory.layers='0': memory kind 'rmt' is model-level.*layers='all'"):
    LM2Model(tiny_config("rmt", memory_layers="0"))
  cfg = LM2Model(tiny_config("rmt")).config
  assert cfg.memory_layers == () and cfg.memory.num_slots == 6
  assert count_params(LM2Model(tiny_config("rmt")))["memory"] == 6 * 32 + 32  # initial memory, write norm


def test_reading_every_config_leaves_the_devices_untouched():
  """Launchers read the config before `jax.distributed.initialize`, which must come before any device is touched:
  building the model config of every file in configs/ (the BABILong family counts parameters) must not start a
  JAX backend. Checked in a fresh process, where nothing else has started one."""
  import subprocess
  import sys
  code = """
import glob, importlib, os
from jax._src import xla_bridge
from lm2_jax.model.config import ModelConfig
for path in sorted(glob.glob("configs/*.py")):
  name = os.path.basename(path)[:-3]
  if name in ("__init__", "babilong"):
    continue
  ModelConfig.from_config(importlib.import_module("configs." + name).get_config().model)
  assert not xla_bridge.backends_are_initialized(), name + " started a JAX backend"
print("ok")
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
