"""Behaviour of the decoder with segment recurrence: causality, memory, gradients, layouts, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build, forward, logits_fn, random_tokens, tiny_config
from lm2_jax.model import LM2Model, count_params, scan_layout, unscan_layout
from lm2_jax.train.loss import next_token_loss

SEG = 8  # tiny_config's segment_len


@pytest.mark.parametrize("kind", ["none", "lm2", "hierarchical", "rmt", "memoryllm", "mplus", "armt", "titans", "hmt"])
def test_causal(kind):
  """Changing token t (in the first segment, at a segment boundary, in a later segment) changes nothing before t."""
  model, params = build(tiny_config(kind))
  f = logits_fn(model, params)
  tokens = random_tokens(0, (2, 4 * SEG))
  a = np.asarray(f(tokens))
  for t in (3, SEG, 2 * SEG + 5):
    b = np.asarray(f(tokens.at[:, t].set((tokens[:, t] + 1) % 64)))
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0, err_msg=f"t={t}")
    assert np.abs(a[:, t] - b[:, t]).max() > 1e-4  # the changed token itself does change its own logits


def test_memory_carries_information_across_segments():
  tokens = random_tokens(0, (2, 4 * SEG))  # test_causal's shape: one compilation for both
  changed = tokens.at[:, :SEG].set(random_tokens(1, (2, SEG)))
  for kind, expect_change in [("lm2", True), ("hierarchical", True), ("rmt", True), ("armt", True),
                              ("memoryllm", True), ("titans", True), ("hmt", True), ("none", False)]:
    model, params = build(tiny_config(kind))
    f = logits_fn(model, params)
    diff = np.abs(np.asarray(f(tokens))[:, SEG:] - np.asarray(f(changed))[:, SEG:]).max()
    assert (diff > 1e-4) if expect_change else (diff == 0), (kind, diff)


def test_none_segment_is_an_independent_window():
  """With memory 'none', segment 2 of a long input gives the logits of segment 2 run on its own."""
  model, params = build(tiny_config("none"))
  f = logits_fn(model, params)
  tokens = random_tokens(0, (2, 3 * SEG))
  np.testing.assert_allclose(np.asarray(f(tokens))[:, SEG:2 * SEG], np.asarray(f(tokens[:, SEG:2 * SEG])),
                             atol=1e-5, rtol=0)


def _memory_leaves(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
          if "'memory'" in jax.tree_util.keystr(p)}


def test_gradients_reach_every_memory_parameter():
  model, params = build(tiny_config("lm2", bptt_segments=3))
  tokens = random_tokens(0, (2, 3 * SEG))
  w = jax.random.normal(jax.random.key(1), (2, 3 * SEG, 64))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens)[0] * w)))(params)
  leaves = _memory_leaves(grads)
  assert len(leaves) == 12  # q, k, v, o, u kernels; out, in, forget gates (kernel + bias); slot norm scale
  for name, g in leaves.items():
    assert np.abs(np.asarray(g)).max() > 0, name


def _segment_embedding_grads(kind, bptt):
  """|d loss(segment 3) / d embedding rows| of the tokens of each segment (disjoint vocabularies)."""
  model, params = build(tiny_config(kind, bptt_segments=bptt))
  tokens = (jnp.arange(4)[:, None] * 16 + random_tokens(0, (4, SEG), vocab=16)).reshape(1, 4 * SEG)
  w = jax.random.normal(jax.random.key(1), (1, SEG, 64))
  loss = lambda p: jnp.sum(model.apply({"params": p}, tokens)[0][:, 3 * SEG:] * w)
  g = np.asarray(jax.jit(jax.grad(loss))(params)["embed"]["embedding"])
  return [np.abs(g[16 * s:16 * (s + 1)]).max() for s in range(4)], model, params, tokens


@pytest.mark.parametrize("kind", ["lm2", "rmt", "memoryllm", "mplus", "armt", "titans", "hmt"])
def test_gradients_stop_beyond_bptt_segments(kind):
  # bptt_segments=2 cuts the memory entering segments 0 and 2: the loss of segment 3 reaches segment 2's tokens
  # through the memory, never segments 0 and 1 (though its value still depends on them).
  g, model, params, tokens = _segment_embedding_grads(kind, bptt=2)
  assert g[3] > 0 and g[2] > 0
  assert g[0] == 0 and g[1] == 0
  f = logits_fn(model, params)
  changed = tokens.at[:, :SEG].set((tokens[:, :SEG] + 1) % 16)
  assert np.abs(np.asarray(f(tokens))[:, 3 * SEG:] - np.asarray(f(changed))[:, 3 * SEG:]).max() > 1e-4
  # bptt_segments=0: the gradient flows through the whole input.
  g_full, *_ = _segment_embedding_grads(kind, bptt=0)
  assert min(g_full) > 0


@pytest.mark.parametrize("kind,layers", [("lm2", "all"), ("lm2", "1,2"), ("rmt", "all"), ("armt", "1,2")])
def test_scan_layers_matches_unscanned(kind, layers):
  """Scanned layers and a rolled segment loop against unscanned, rematerialised layers and a segment loop unrolled
  by 2 (of 3 segments: one unrolled pair, then the remainder)."""
  scanned_cfg = tiny_config(kind, num_layers=4, memory_layers=layers, scan_layers=True, bptt_segments=2)
  loop_cfg = tiny_config(kind, num_layers=4, memory_layers=layers, scan_layers=False, bptt_segments=2,
                         remat_policy="full", segment_unroll=2)
  scanned, p_scan = build(scanned_cfg)
  loop = LM2Model(loop_cfg)
  p_loop = unscan_layout(p_scan, scanned.config)
  assert set(p_loop["decoder"]) - {"memory"} == {f"layer_{i}" for i in range(4)}  # rmt, armt: decoder/memory
  tokens = random_tokens(0, (2, 3 * SEG))
  w = jax.random.normal(jax.random.key(1), (2, 3 * SEG, 64))

  def run(model, p):
    (loss, (mem, aux)), g = jax.jit(jax.value_and_grad(
        lambda p: (lambda out: (jnp.sum(out[0] * w), out[1:]))(model.apply({"params": p}, tokens)), has_aux=True))(p)
    return loss, mem, g

  loss_s, mem_s, g_s = run(scanned, p_scan)
  loss_l, mem_l, g_l = run(loop, p_loop)
  np.testing.assert_allclose(loss_s, loss_l, rtol=1e-5)
  chex.assert_trees_all_close(mem_s, mem_l, atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(g_s, scan_layout(g_l, loop.config), atol=1e-5, rtol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  tokens = random_tokens(0, (2, 2 * SEG))
  model32, params = build(tiny_config("lm2"))
  model16 = LM2Model(tiny_config("lm2", dtype="bfloat16"))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  out32, mem32, _ = model32.apply({"params": params}, tokens)
  out16, mem16, _ = model16.apply({"params": params}, tokens)
  assert out16.dtype == jnp.float32 and mem16["slots"].dtype == jnp.float32
  assert np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.05 * np.abs(np.asarray(out32)).max()


def test_memory_state_and_read_statistics():
  model, params = build(tiny_config("lm2"))
  mem = model.init_memory(3)
  chex.assert_shape((mem["slots"], mem["read_mass"]), ((2, 3, 6, 32), (2, 3, 6)))
  np.testing.assert_array_equal(mem["slots"][0, 0], np.eye(6, 32))  # identity-like start
  _, new_mem, aux = model.apply({"params": params}, random_tokens(0, (3, 2 * SEG)), mem)
  # aux read mass: the mean over tokens, heads and segments of a softmax over slots, so it sums to 1.
  np.testing.assert_allclose(np.asarray(aux["memory_stats"]["read_mass"]).sum(-1), 1.0, atol=1e-5)
  # state read mass: decayed total over the 2 segments: sums to read_decay * 1 + 1.
  np.testing.assert_allclose(np.asarray(new_mem["read_mass"]).sum(-1), 0.99 + 1.0, atol=1e-5)
  # Memory carried into a second call continues from where the first left off.
  _, mem2, _ = model.apply({"params": params}, random_tokens(1, (3, SEG)), new_mem)
  assert not np.allclose(mem2["slots"], new_mem["slots"])


def test_wrong_memory_state_is_rejected():
  model, params = build(tiny_config("lm2"))
  with pytest.raises(ValueError, match="init_memory"):
    model.apply({"params": params}, random_tokens(0, (2, SEG)), model.init_memory(3))


def test_count_params_splits_memory():
  counts = count_params(LM2Model(tiny_config("lm2")))
  assert counts["memory"] > 0 and counts["decoder"] + counts["memory"] == counts["total"]
  assert count_params(LM2Model(tiny_config("none")))["total"] == counts["decoder"]


@pytest.mark.parametrize("kind", ["none", "lm2", "hierarchical", "rmt", "memoryllm", "mplus", "armt", "titans", "hmt"])
def test_documents_do_not_see_each_other(kind):
  """Two documents packed in one row (the second starts mid-segment): changing either one leaves the other's
  logits exactly as they were, through attention and through the memory."""
  model, params = build(tiny_config(kind))
  apply = forward(model.config)
  f = lambda toks, ids: apply(params, toks, None, ids)[0]
  start = 2 * SEG + 3
  ids = jnp.where(jnp.arange(4 * SEG) < start, 7, 9)[None].repeat(2, 0)
  tokens = random_tokens(0, (2, 4 * SEG))
  first, second = np.asarray(f(tokens, ids))[:, :start], np.asarray(f(tokens, ids))[:, start:]
  other_first = tokens.at[:, :start].set(random_tokens(1, (2, start)))
  other_second = tokens.at[:, start:].set(random_tokens(2, (2, 4 * SEG - start)))
  np.testing.assert_array_equal(np.asarray(f(other_first, ids))[:, start:], second)
  np.testing.assert_array_equal(np.asarray(f(other_second, ids))[:, :start], first)
  # Without document ids the second document does see the first (through attention in its first segment).
  assert np.abs(np.asarray(f(other_first, jnp.ones_like(ids)))[:, start:]
                - np.asarray(f(tokens, jnp.ones_like(ids)))[:, start:]).max() > 1e-4


@pytest.mark.parametrize("kind", ["none", "lm2", "hierarchical", "rmt", "memoryllm", "mplus", "armt", "titans", "hmt"])
def test_document_starting_at_a_segment_is_computed_as_if_alone(kind):
  """A document that starts at a segment boundary reads a fresh memory, exactly as if the row held it alone;
  one-document rows give the logits of a call without segment_ids."""
  model, params = build(tiny_config(kind))
  apply = forward(model.config)
  f = lambda toks, ids: apply(params, toks, None, ids)[0]
  tokens = random_tokens(0, (2, 4 * SEG))
  ids = jnp.where(jnp.arange(4 * SEG) < SEG, 1, 2)[None].repeat(2, 0)
  alone = logits_fn(model, params)
  np.testing.assert_allclose(np.asarray(f(tokens, ids))[:, SEG:], np.asarray(alone(tokens[:, SEG:])), atol=1e-5)
  np.testing.assert_allclose(np.asarray(f(tokens, jnp.ones_like(ids))), np.asarray(alone(tokens)), atol=1e-6)


@pytest.mark.parametrize("kind", ["none", "lm2", "hierarchical", "rmt", "memoryllm", "mplus", "armt", "titans", "hmt"])
def test_gradients_are_finite_when_a_document_starts_mid_segment(kind):
  """The tokens before a mid-segment boundary write nothing into the memory. The loss's gradient must still be
  finite. titans' update norm of an all-unwritten chunk gave NaN gradients, found on BABILong's packed rows."""
  model, params = build(tiny_config(kind))
  tokens = random_tokens(0, (2, 4 * SEG))
  ids = jnp.where(jnp.arange(4 * SEG) < 2 * SEG + 5, 7, 9)[None].repeat(2, 0)

  def loss(p):
    return next_token_loss(model.apply({"params": p}, tokens, None, segment_ids=ids)[0], tokens)[0]

  grads = jax.jit(jax.grad(loss))(params)
  bad = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads) if not np.isfinite(g).all()]
  assert not bad, bad


def test_reset_memory_replaces_only_the_flagged_rows():
  model, params = build(tiny_config("lm2"))
  _, memory, _ = model.apply({"params": params}, random_tokens(0, (3, 2 * SEG)))
  reset = model.reset_memory(memory, jnp.array([False, True, False]))
  fresh = model.init_memory(3)
  for name in memory:
    np.testing.assert_array_equal(reset[name][:, 1], fresh[name][:, 1])
    np.testing.assert_array_equal(reset[name][:, 0::2], memory[name][:, 0::2])


@pytest.mark.parametrize("kind", ["lm2", "rmt", "mplus", "armt", "titans", "hmt"])
def test_memory_passed_between_calls_continues_the_stream(kind):
  """Two calls that pass the memory on give the logits and the memory of one call over both inputs."""
  model, params = build(tiny_config(kind))
  apply = forward(model.config)
  tokens = random_tokens(0, (2, 3 * SEG))
  whole, whole_mem = apply(params, tokens)
  first, mem = apply(params, tokens[:, :2 * SEG])
  second, second_mem = apply(params, tokens[:, 2 * SEG:], mem)
  np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(second_mem, whole_mem, atol=1e-5, rtol=0)


def test_rmt_memory_tokens():
  """rmt: the state is [B, M, D] memory tokens, zeros when fresh, which the model reads as its learned initial
  memory; the written memory is the normalised output at the write positions; reset clears flagged rows."""
  model, params = build(tiny_config("rmt"))
  mem = model.init_memory(3)
  assert jax.tree.map(jnp.shape, mem) == {"tokens": (3, 6, 32)} and not np.asarray(mem["tokens"]).any()
  assert model.memory_axes() == {"tokens": ("batch", "mem_slots", "embed")}
  assert params["decoder"]["memory"]["initial"].shape == (6, 32)
  tokens = random_tokens(0, (3, 2 * SEG))
  logits, new_mem, aux = model.apply({"params": params}, tokens, mem)
  assert aux == {"memory_stats": {}, "losses": {}}
  rms = np.sqrt((np.asarray(new_mem["tokens"]) ** 2).mean(-1))
  np.testing.assert_allclose(rms, 1.0, atol=1e-3)  # RMSNorm with its initial scale of ones
  # A fresh memory is the learned initial memory: changing it changes the first segment's logits.
  moved = jax.tree.map(lambda a: a, params)
  moved["decoder"]["memory"]["initial"] = params["decoder"]["memory"]["initial"] + 0.1
  assert np.abs(np.asarray(model.apply({"params": moved}, tokens, mem)[0])[:, :SEG] - logits[:, :SEG]).max() > 1e-4
  reset = model.reset_memory(new_mem, jnp.array([False, True, False]))
  assert not np.asarray(reset["tokens"][1]).any()
  np.testing.assert_array_equal(reset["tokens"][0::2], new_mem["tokens"][0::2])


def test_rmt_gradients_reach_its_parameters():
  model, params = build(tiny_config("rmt", bptt_segments=2))
  tokens = random_tokens(0, (2, 3 * SEG))
  w = jax.random.normal(jax.random.key(1), (2, 3 * SEG, 64))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens)[0] * w)))(params)
  for name, g in _memory_leaves(grads).items():  # the initial memory and the write norm's scale
    assert np.abs(np.asarray(g)).max() > 0, name
  assert len(_memory_leaves(grads)) == 2


def test_shared_memory_reads_the_entering_memory_and_writes_layer_after_layer():
  """share_across_layers: one state without a layers axis; after a segment it is M2 = write_1(write_0(M0, h_0),
  h_1) while both layers read M0 (recomputed here from each layer's own memory module); causal; and one
  memory layer shared is the per-layer memory exactly."""
  from lm2_jax.model.decoder import DecoderLayer, LayerContext
  from lm2_jax.model.layers import rope_tables
  from lm2_jax.model.memory.lm2 import LM2Memory
  model, params = build(tiny_config("lm2", memory_share_across_layers=True, scan_layers=False))
  assert jax.tree.map(jnp.shape, model.init_memory(2)) == {"slots": (2, 6, 32), "read_mass": (2, 6)}
  tokens = random_tokens(0, (2, SEG))
  _, new, _ = model.apply({"params": params}, tokens)
  # The two layers run one by one, capturing each memory's input h (the attention norm's output).
  m0 = model.init_memory(2)
  x = params["embed"]["embedding"][tokens]
  ctx = LayerContext(*rope_tables(model.config, jnp.arange(SEG)), entering=m0)
  running, h = m0, []
  for i in range(2):
    ((x, running), _), state = DecoderLayer(model.config, True).apply(
        {"params": params["decoder"][f"layer_{i}"]}, (x, running), ({}, None), ctx, mutable=["intermediates"],
        capture_intermediates=lambda m, _: m.name == "attn_norm")
    h.append(state["intermediates"]["attn_norm"]["__call__"][0])
  np.testing.assert_allclose(new["slots"], running["slots"], atol=1e-5)
  mem = LM2Memory(model.config)
  step = lambda i, write: mem.apply({"params": params["decoder"][f"layer_{i}"]["memory"]}, m0, h[i],
                                    write_state=write, method=LM2Memory.step)[1]
  want = step(1, step(0, m0))
  np.testing.assert_allclose(new["slots"], want["slots"], atol=1e-5)
  np.testing.assert_allclose(new["read_mass"], want["read_mass"], atol=1e-6)

  f = logits_fn(model, params)
  tokens = random_tokens(0, (2, 3 * SEG))
  a = np.asarray(f(tokens))
  for t in (3, SEG + 2):
    b = np.asarray(f(tokens.at[:, t].set((tokens[:, t] + 1) % 64)))
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0, err_msg=f"t={t}")

  one_shared, p = build(tiny_config("lm2", memory_layers="1", memory_share_across_layers=True))
  one = LM2Model(tiny_config("lm2", memory_layers="1"))
  got, got_mem, _ = one_shared.apply({"params": p}, tokens)
  ref, ref_mem, _ = one.apply({"params": p}, tokens)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  np.testing.assert_allclose(got_mem["slots"], ref_mem["slots"][0], atol=1e-5)
