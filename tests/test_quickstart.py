"""The main job end to end, shrunk: trains both models, writes the table's JSON and the learning-curve PNG."""

import json
import subprocess
import sys


def test_quickstart_writes_results_and_plot(tmp_path):
  overrides = ["--config.train.steps=3", "--config.train.batch_size=8", "--config.train.log_every=1",
               "--config.train.warmup_steps=1", "--config.model.d_model=32", "--config.model.d_ff=64",
               "--config.model.segment_len=16", "--config.train.seq_len=64", "--eval_samples=8"]
  out = subprocess.run([sys.executable, "-m", "launch.quickstart", f"--workdir={tmp_path}", *overrides],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "quickstart_results.json").read_text())
  assert set(results["accuracy"]) == {"lm2", "none"}
  assert set(results["accuracy"]["lm2"]) == {"64_tokens", "256_tokens"}
  assert results["chance"] == 1 / 16 and results["steps"] == 3
  assert all(0 <= a <= 1 for accs in results["accuracy"].values() for a in accs.values())
  assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert "| lm2 |" in out.stdout and "| none |" in out.stdout
