"""The model on a mesh of 8 CPU devices (data=2, fsdp=2, tensor=2) computes what it computes on one device."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, random_tokens, tiny_config
from lm2_jax.model import ConfigError, param_axes
from lm2_jax.parallel import logical_shardings, make_mesh, use_mesh


def test_mesh_sizes():
  assert make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ConfigError, match="mesh"):
    make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
  # Every device once, in the order of the device list for a plain CPU reshape.
  mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  with pytest.raises(ConfigError, match="mesh.dcn_data.*there are 1 processes"):
    make_mesh({"data": -1, "dcn_data": 2})  # one process cannot be two granules
  with pytest.raises(ConfigError, match="mesh.dcn_data"):
    make_mesh({"data": -1, "dcn_data": 3})  # 3 does not divide 8 devices


@pytest.mark.parametrize("kind", ["none", "lm2", "hierarchical", "rmt", "armt", "mplus", "titans", "hmt"])
def test_sharded_forward_and_grad_match_one_device(kind):
  assert len(jax.devices()) == 8
  model, params = build(tiny_config(kind))
  tokens = random_tokens(0, (4, 16))
  w = jax.random.normal(jax.random.key(1), (4, 16, 64))

  def loss(p, toks, mem):
    logits, new_mem, _ = model.apply({"params": p}, toks, mem)
    return jnp.sum(logits * w), (logits, new_mem)

  step = jax.value_and_grad(loss, has_aux=True)
  (_, (want_logits, want_mem)), want_grads = jax.jit(step)(params, tokens, model.init_memory(4))

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  p_sh = logical_shardings(param_axes(model), mesh)
  m_sh = logical_shardings(model.memory_axes(), mesh)
  t_sh = logical_shardings(("batch", "length"), mesh)
  # Every parameter carries logical names, and the big ones really are split across devices.
  assert jax.tree.structure(p_sh) == jax.tree.structure(params)
  assert p_sh["decoder"]["layers_0_2"]["mlp"]["up_proj"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  with use_mesh(mesh):
    sharded = jax.jit(step, in_shardings=(p_sh, t_sh, m_sh), out_shardings=((None, (None, m_sh)), p_sh))
    (_, (logits, mem)), grads = sharded(jax.device_put(params, p_sh), jax.device_put(tokens, t_sh),
                                     jax.device_put(model.init_memory(4), m_sh))
  # Float32 tolerance: sharded matmuls sum in another order (differences of ~1e-5 on logits of ~0.5).
  chex.assert_trees_all_close((logits, mem, grads), (want_logits, want_mem, want_grads), atol=5e-5, rtol=1e-3)
  assert len(grads["embed"]["embedding"].sharding.device_set) == 8
  if kind == "hierarchical":  # banks split over the tensor axis (logical axis mem_banks)
    assert m_sh["bank_slots"].spec[2] == "tensor" and mem["bank_slots"].sharding.spec[2] == "tensor"
