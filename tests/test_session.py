"""Sessions: inject, ask, save and restore in a fresh process, the history, and refusals."""

import json
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import build, tiny_config
from lm2_jax.data.babi.training import ensure_tokenizer
from lm2_jax.model.config import ConfigError
from lm2_jax.sessions import Session

FACTS = "Mary went to the kitchen. John moved to the garden. Daniel travelled to the office."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return ensure_tokenizer(str(tmp_path_factory.mktemp("tok") / "spm.model"), 768)


_RESTORE_AND_ASK = """
import json, sys
import orbax.checkpoint as ocp
sys.path.insert(0, "tests")
from helpers import tiny_config
from lm2_jax.data.tokenizer import Tokenizer
from lm2_jax.sessions import Session
params_path, session_path, tok_path, kind = sys.argv[1:]
params = ocp.StandardCheckpointer().restore(params_path)
s = Session.restore(session_path, params, tiny_config(kind, vocab_size=768), Tokenizer(tok_path))
answer = s.ask("Where is Mary?", max_new_tokens=6)
print(json.dumps({"answer": answer, "position": s.position, "history": len(s.history)}))
"""


def test_session_saved_then_restored_in_a_fresh_process_answers_the_same(tmp_path, tok):
  config = tiny_config("lm2", vocab_size=768)
  _, params = build(config)
  s = Session(params, config, tok)
  s.inject(FACTS)  # more than one 8-token segment: the memory is written, the tail is pending
  assert s.position == len(tok.encode(FACTS)) + 1  # with bos
  assert s.history[0]["kind"] == "inject" and s.history[0]["end"] == s.position
  assert set(s.history[0]["read_stats"]) == {"['read_mass']"}
  s.save(str(tmp_path / "session"))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "params", params)
  answer = s.ask("Where is Mary?", max_new_tokens=6)
  out = subprocess.run([sys.executable, "-c", _RESTORE_AND_ASK, str(tmp_path / "params"), str(tmp_path / "session"),
                        tok.path, "lm2"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  restored = json.loads(out.stdout.strip().splitlines()[-1])
  assert restored == {"answer": answer, "position": s.position, "history": 2}


def test_segment_kind_and_titans_sessions_restore_and_none_session_runs(tmp_path, tok):
  for kind in ("rmt", "armt", "hmt", "none", "titans"):
    config = tiny_config(kind, vocab_size=768)
    _, params = build(config)
    s = Session(params, config, tok)
    s.inject(FACTS)
    s.save(str(tmp_path / kind))
    answer = s.ask("Where is John?", max_new_tokens=4)
    again = Session.restore(str(tmp_path / kind), params, config, tok)
    assert again.ask("Where is John?", max_new_tokens=4) == answer
    s.reset()
    assert s.position == 0 and s.history == []


def test_restore_under_another_config_or_params_is_refused_naming_both(tmp_path, tok):
  config = tiny_config("lm2", vocab_size=768)
  _, params = build(config)
  s = Session(params, config, tok)
  s.inject(FACTS)
  s.save(str(tmp_path / "s"))
  more_slots = tiny_config("lm2", vocab_size=768, memory_num_slots=7)  # the same parameter shapes
  with pytest.raises(ConfigError, match=r"saved under another model config.*'memory.num_slots': \(6, 7\)"):
    Session.restore(str(tmp_path / "s"), params, more_slots, tok)
  narrow = tiny_config("lm2", vocab_size=768, memory_slot_dim=16)
  shapes = r"params: their shapes do not match config.model; \(name, params, config\).*forget_gate.*\[2, 32\], \[2, 16\]"
  with pytest.raises(ConfigError, match=shapes):
    Session(params, narrow, tok)


def test_bad_session_input_is_named(tmp_path, tok):
  config = tiny_config("lm2", vocab_size=768)
  _, params = build(config)
  s = Session(params, config, tok)
  with pytest.raises(ValueError, match="inject: give non-empty text"):
    s.inject("  ")
  with pytest.raises(ValueError, match="the session is empty"):
    s.generate()
  with pytest.raises(ConfigError, match="config.model.vocab_size=64: the tokenizer .* has 768 pieces"):
    Session(build(tiny_config("lm2"))[1], tiny_config("lm2"), tok)
  with pytest.raises(ConfigError, match="no session.json"):
    Session.restore(str(tmp_path / "missing"), params, config, tok)
  assert np.isfinite(np.asarray(s.state.logits_BV)).all()


def test_mplus_session_spills_to_the_host_store_refills_and_restores(tmp_path, tok):
  """mplus: dropped pool tokens reach the host store (as many as the device store took), a question refills the
  device store from it, and a restored session (host store included) answers the same; another config is
  refused."""
  config = tiny_config("mplus", vocab_size=768, memory_num_slots=4, memory_update_tokens=4, memory_ltm_capacity=6,
                       memory_retrieve_tokens=2, memory_retriever_dim=8)
  _, params = build(config)
  s = Session(params, config, tok)
  s.inject(FACTS + " " + FACTS)  # > 6 segments: more tokens are dropped than the device store (6) holds
  segments = s.position // 8
  assert s.ltm.size.tolist() == [4 * (segments - 1)] * 2  # every write after the first drops 4 pool tokens
  s.save(str(tmp_path / "s"))
  answer = s.ask("Where is Mary?", max_new_tokens=4)
  filled = np.asarray(s.state.memory["store_filled"])
  assert (filled.sum(-1) == 6).all()  # refilled from the host store
  again = Session.restore(str(tmp_path / "s"), params, config, tok)
  assert again.ltm.size.tolist() == [4 * (segments - 1)] * 2
  assert again.ask("Where is Mary?", max_new_tokens=4) == answer
  other = tiny_config("mplus", vocab_size=768, memory_num_slots=4, memory_update_tokens=4, memory_ltm_capacity=6,
                      memory_retrieve_tokens=2, memory_retriever_dim=8, memory_layers="1")
  with pytest.raises(ConfigError, match="saved under another model config"):
    Session.restore(str(tmp_path / "s"), build(other)[1], other, tok)
