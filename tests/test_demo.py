"""`dihal demo` end to end at the smoke preset on the tiny random model (the reduced `make demo`)."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO




@pytest.mark.slow
def test_demo_smoke_runs_the_whole_pipeline(tmp_path):
  workdir = tmp_path / "demo"
  proc = subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "demo", "--config=configs/tiny_llama.py",
       "--config.demo.preset=smoke", f"--workdir={workdir}",
       f"--config.data.cache_dir={tmp_path / 'cache'}"],
      cwd=REPO, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  from dihal_jax.eval.evaluate import default_methods
  assert list(report["results"]) == default_methods(
      ml_collections.ConfigDict(report["effective_config"]))
  assert "dihal_lm_head" in report["results"] and "dihal_blockwise" not in report["results"]
  assert set(report["sets"]) == {"test", "ood"}
  for rows in report["sets"].values():
    for method, row in rows.items():
      for key in ("gen_ppl", "ngram_ppl", "mauve", "distinct_1", "distinct_2", "distinct_3",
                  "diversity", "entropy", "memorization_4gram"):
        assert np.isfinite(row[key]), (method, key)
      for key in ("gen_ppl", "ngram_ppl", "entropy"):
        lo, hi = row[f"{key}_ci"]
        assert lo <= row[key] <= hi, (method, key)
      assert row["num_samples"] == 8 and row["mauve_reference"] == 8
      if method.startswith("dihal") or method == "embedding_rounding":
        assert np.isfinite(row["val_mse"]) and np.isfinite(row["spread_ratio"]), method
  assert {"unigram_sampler", "bigram_sampler"} <= set(report["results"])
  continuation = report["continuation"]
  assert set(continuation) == {"real_text", *(m for m in report["results"]
                                              if m not in ("real_text", "oracle", "oracle_lm_head"))}
  for method, row in continuation.items():
    assert 0.0 <= row["mauve"] <= 1.0 and 0.0 <= row["first_token_repeat"] <= 1.0, method
    assert row["ngram_ppl_ci"][0] <= row["ngram_ppl"] <= row["ngram_ppl_ci"][1], method
  assert report["judges"]["ngram"]["order"] == 4
  assert report["results"]["dihal_l0"]["layer"] == 0
  assert report["mdm"]["step"] == 6 and "mdm" in report["continuation"]  # the preset's budget
  assert report["mdm_block"]["trained_block"] == 16 and "mdm_block" in report["continuation"]
  assert report["results"]["dihal"]["ar_share"] > 0
  assert report["results"]["oracle"]["ar_share"] > 0  # the blockwise readout of true states
  assert "oracle_lm_head" in report["results"] and "oracle_lm_head" in report["samples"]
  assert report["train"]["layer"] == report["locate"]["selected_layer"]
  # the smoke preset's tolerant decoder trained after the bridge, into WORKDIR/decoder
  assert report["train"]["tolerant_decoder"]["steps"] == 6
  assert json.loads((workdir / "decoder" / "metrics.jsonl").read_text().splitlines()[-1])[
      "step"] == 6
  assert report["effective_config"]["train"]["steps"] == 12  # the preset was applied
  for name in ("report.md", "parity.png", "geometry.png", "loss.png", "eval.png"):
    assert (workdir / name).is_file(), name
  assert "| real_text |" in (workdir / "report.md").read_text()


@pytest.mark.slow
def test_demo_unknown_preset_exits_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "demo", "--config=configs/tiny_llama.py",
       "--config.demo.preset=huge", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "demo.preset" in proc.stderr.splitlines()[-1]


def test_presets_set_existing_fields_only():
  """Every preset path names a field of the default config (a typo would add a new one)."""
  from conftest import load_config
  from dihal_jax import demo
  for name, overrides in demo.PRESETS.items():
    config = load_config("smollm2_135m")
    config.demo.preset = name
    applied = demo.apply_preset(config)
    flat = applied.to_dict()
    for path, value in overrides.items():
      node = load_config("smollm2_135m").to_dict()
      for part in path.split("."):
        assert part in node, (name, path)
        node = node[part]
      got = flat
      for part in path.split("."):
        got = got[part]
      assert got == value, (name, path)
