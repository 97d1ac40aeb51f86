"""The LM2 memory against a NumPy transcription of its equations (DESIGN section 4)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import tiny_config
from lm2_jax.model import ModelConfig
from lm2_jax.model.layers import attention_transpose
from lm2_jax.model.memory.lm2 import LM2Memory, identity_like_slots


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _reference(p, slots, h, num_heads, decay, read_mass):
  """Read and write of one layer, one batch element, written head by head from the equations."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  S = slots.shape[-1]
  normed = slots / np.sqrt(np.mean(slots**2, axis=-1, keepdims=True) + 1e-5) * p["slot_norm"]["scale"]
  E = S // num_heads
  flat = lambda w: w.reshape(w.shape[0], -1)       # [in, R, E] -> [in, R*E]
  q, k, v, u = (flat(p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj", "u_proj"))
  o = p["o_proj"]["kernel"].reshape(-1, h.shape[-1])
  gate_w, gate_b = p["out_gate"]["kernel"].reshape(-1, h.shape[-1]), p["out_gate"]["bias"]
  x = h + np.concatenate([np.zeros_like(h[:1]), h[:-1]])              # token shift: x_l = h_l + h_{l-1}
  read, update, mass, strengths = [], [], 0, []
  for r in range(num_heads):
    sl = slice(r * E, (r + 1) * E)
    scores = (h @ q[:, sl]) @ (normed @ k[:, sl]).T / np.sqrt(E)     # [L, N]
    p_read = _softmax(scores, axis=1)
    read.append(p_read @ (normed @ v[:, sl]))                          # [L, E]
    write_scores = (x @ q[:, sl]) @ (normed @ k[:, sl]).T / np.sqrt(E)
    strength = _sigmoid(x @ p["write_gate"]["kernel"][:, r] + p["write_gate"]["bias"][r]) if "write_gate" in p else 1
    strengths.append(np.broadcast_to(strength, (len(h),)))
    update.append(_softmax(write_scores, axis=1).T @ ((x @ u[:, sl]) * np.reshape(strength, (-1, 1))))  # [N, E]
    mass = mass + p_read.mean(0) / num_heads
  e_mem = np.concatenate(read, axis=1)
  delta = _sigmoid(e_mem @ gate_w + gate_b) * (e_mem @ o)
  U = np.concatenate(update, axis=1)
  mu = np.concatenate([slots, U], axis=1)
  g_in = _sigmoid(mu @ p["in_gate"]["kernel"] + p["in_gate"]["bias"])
  g_f = _sigmoid(mu @ p["forget_gate"]["kernel"] + p["forget_gate"]["bias"])
  gates = {"in_gate": g_in.mean(), "forget_gate": g_f.mean(), "write_strength": np.mean(strengths, axis=0)}
  return delta, g_in * np.tanh(U) + g_f * slots, decay * read_mass + mass, gates


@pytest.mark.parametrize("write_gate,forget_bias", [(False, 1.0), (True, 3.0)])
def test_read_and_write_match_the_equations(write_gate, forget_bias):
  cfg = ModelConfig.from_config(tiny_config("lm2", memory_num_slots=5, memory_num_heads=2, memory_read_decay=0.9,
                                            memory_write_gate=write_gate, memory_forget_bias=forget_bias))
  mem = LM2Memory(cfg)
  B, L = 2, 7
  h = np.asarray(jax.random.normal(jax.random.key(0), (B, L, cfg.d_model)))
  state = {"slots": np.asarray(jax.random.normal(jax.random.key(1), (B, 5, cfg.d_model))),
           "read_mass": np.asarray(jax.random.uniform(jax.random.key(2), (B, 5)))}
  fresh = nn.unbox(mem.init(jax.random.key(3), state, h, method=LM2Memory.step))["params"]
  np.testing.assert_array_equal(fresh["forget_gate"]["bias"], forget_bias)  # b_f starts at memory.forget_bias
  assert ("write_gate" in fresh) == write_gate
  np.testing.assert_array_equal(fresh["in_gate"]["bias"], 0.0)      # b_in starts at 0
  leaves, treedef = jax.tree.flatten(fresh)  # perturb every parameter, biases included
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = {"params": treedef.unflatten([a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])}
  out, new_state = mem.apply(params, state, h, method=LM2Memory.step)  # read and write in one call
  delta = out.residual_BLD
  for b in range(B):
    want_delta, want_slots, want_mass, want_gates = _reference(params["params"], state["slots"][b], h[b], 2, 0.9,
                                                               state["read_mass"][b])
    for name, want in want_gates.items():  # the gates' statistics (aux["memory_stats"] of the model)
      np.testing.assert_allclose(out.stats[name][b], want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(delta[b], want_delta, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(new_state["slots"][b], want_slots, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(new_state["read_mass"][b], want_mass, atol=1e-6)


def test_identity_like_slots():
  np.testing.assert_array_equal(identity_like_slots(4, 8), np.eye(4, 8))
  many = identity_like_slots(64, 16)  # more slots than dimensions: unit-norm, deterministic
  np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(many, identity_like_slots(64, 16))


def test_attention_transpose_is_p_transpose_u_with_its_gradients():
  """layers.attention_transpose (LM2's write sum U = P^T u by an attention kernel's backward pass, for cuDNN; here
  the 'xla' implementation) against NumPy, and its hand-written gradients against autodiff of the einsum."""
  B, L, S, H, E = 2, 5, 7, 3, 4
  q, k, u = (jax.random.normal(jax.random.key(i), (B, n, H, E)) for i, n in enumerate((L, S, L)))
  p = _softmax(np.einsum("blhe,bshe->bhls", np.float64(q), np.float64(k)) / np.sqrt(E), axis=-1)
  np.testing.assert_allclose(attention_transpose(q, k, u, "xla"), np.einsum("bhls,blhe->bshe", p, np.float64(u)),
                             rtol=1e-5, atol=1e-6)

  def einsum_form(q, k, u):
    p = jax.nn.softmax(jax.numpy.einsum("blhe,bshe->bhls", q, k) / np.sqrt(E), axis=-1)
    return jax.numpy.einsum("bhls,blhe->bshe", p, u)

  w = jax.random.normal(jax.random.key(9), (B, S, H, E))
  grads = [jax.grad(lambda *a: (f(*a) * w).sum(), argnums=(0, 1, 2))(q, k, u)
           for f in (lambda q, k, u: attention_transpose(q, k, u, "xla"), einsum_form)]
  for name, g, ref in zip("qku", *grads):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6, err_msg=name)
