"""The GPU attention kernel (`model.attention_kernel='cudnn'`) against a NumPy transcription of causal grouped-query
attention within documents, its gradients against the `xla` kernel's, and bfloat16 models with `cudnn` (LM2's
memory on flash attention too) against the float32 model, as close as with `xla`.

Runs only where JAX's default backend is a GPU (`JAX_PLATFORMS=cuda python -m pytest tests/test_gpu_attention.py`);
CI has none, so it is skipped there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lm2_jax.model import LM2Model, init_params
from lm2_jax.model.layers import causal_attention
from lm2_jax.train.loss import next_token_loss

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN flash attention)")


def numpy_attention(q_BLHE, k_BLKE, v_BLKE, ids_BL):
  """float64 softmax(q k^T / sqrt(E)) v, query l seeing keys s <= l of its own document; head h reads kv head
  h // (H / K)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BLHE, k_BLKE, v_BLKE))
  B, L, H, E = q.shape
  k, v = (np.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
  scores = np.einsum("blhe,bshe->bhls", q, k) / np.sqrt(E)
  seen = np.tril(np.ones((L, L), bool))[None] & (ids_BL[:, :, None] == ids_BL[:, None, :])
  scores = np.where(seen[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhls,bshe->blhe", p, v)


@pytest.mark.parametrize("documents", [False, True])
def test_cudnn_attention_is_numpy_attention(documents):
  B, L, H, K, E = 2, 256, 8, 2, 64
  q, k, v = (jax.random.normal(jax.random.key(i), (B, L, n, E), jnp.bfloat16) for i, n in enumerate((H, K, K)))
  ids = np.sort(np.random.default_rng(0).integers(0, 4, (B, L)), axis=1).astype(np.int32) if documents else None
  out = causal_attention(q, k, v, None if ids is None else jnp.asarray(ids), "cudnn")
  ref = numpy_attention(q, k, v, np.zeros((B, L), np.int32) if ids is None else ids)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2, rtol=2e-2)


def test_cudnn_attention_gradients_are_xla_gradients():
  B, L, H, K, E = 2, 256, 8, 2, 64
  q, k, v = (jax.random.normal(jax.random.key(i), (B, L, n, E), jnp.float32) for i, n in enumerate((H, K, K)))
  w = jax.random.normal(jax.random.key(9), (B, L, H, E), jnp.float32)

  def loss(q, k, v, kernel):
    out = causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None, kernel)
    return jnp.sum(out.astype(jnp.float32) * w)

  grads = {kern: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, kern) for kern in ("cudnn", "xla")}
  for g_cudnn, g_xla in zip(grads["cudnn"], grads["xla"]):
    scale = float(jnp.max(jnp.abs(g_xla)))
    np.testing.assert_allclose(np.asarray(g_cudnn), np.asarray(g_xla), atol=3e-2 * scale)


def _model_outputs(kind, kernel, documents, dtype="bfloat16"):
  """(logits, memory after the last segment, gradients of the next-token loss) of a 2-segment model."""
  model = LM2Model(tiny_config(kind, attention_kernel=kernel, dtype=dtype, num_heads=4, num_kv_heads=2,
                               d_model=256, segment_len=128, bptt_segments=2))
  params = init_params(model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 64)
  ids = jnp.asarray(np.repeat([[0, 0, 0, 1], [0, 1, 1, 1]], 64, axis=1)) if documents else None  # cross segments

  def loss(p):
    logits, memory, _ = model.apply({"params": p}, tokens, segment_ids=ids)
    return next_token_loss(logits, tokens)[0], (logits, memory)

  with jax.default_matmul_precision("highest"):  # no TF32 in the float32 reference
    (_, (logits, memory)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), (logits, memory, grads))


def _relative_rms(x, ref):
  return np.sqrt(np.mean((x - ref) ** 2) / max(np.mean(ref**2), 1e-30))


@pytest.mark.parametrize("kind,documents", [("none", False), ("lm2", False), ("lm2", True), ("hierarchical", False)])
def test_bfloat16_model_with_cudnn_is_as_close_to_float32_as_with_xla(kind, documents):
  """With 'cudnn', self-attention and LM2's read and write (hierarchical's general level too) run on flash
  attention (LM2Memory). Against the float32 model, the bfloat16 model's logits, carried memory (slots, read
  statistics) and every gradient are off by no more than twice the bfloat16 'xla' model's error (relative RMS),
  and by under 25% (hierarchical's bank-key gradients are off by 10% with 'xla' already)."""
  ref = _model_outputs(kind, "xla", documents, "float32")
  cudnn, xla = (_model_outputs(kind, kernel, documents) for kernel in ("cudnn", "xla"))
  leaves = lambda outs: jax.tree_util.tree_leaves_with_path(outs if kind != "none" else (outs[0], outs[2]))
  for (path, r), (_, c), (_, x) in zip(leaves(ref), leaves(cudnn), leaves(xla)):
    err_cudnn, err_xla = _relative_rms(c, r), _relative_rms(x, r)
    assert err_cudnn <= max(2 * err_xla, 1e-3) and err_cudnn < 0.25, (jax.tree_util.keystr(path), err_cudnn,
                                                                       err_xla)
