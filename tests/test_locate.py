"""Locate: streamed moments and reservoir, the score, the report, `dihal locate`."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config
from dihal_jax.backbone.convert import load_model
from dihal_jax.errors import UserInputError
from dihal_jax.geometry import locate
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh


def test_candidate_layers_parsing():
  assert locate.candidate_layers("", 5) == [1, 2, 3, 4]
  assert locate.candidate_layers("3,1-2,3", 5) == [1, 2, 3]
  for bad in ("0", "6", "2-9", "a", "1,,2"):
    with pytest.raises(UserInputError, match="locate.layers"):
      locate.candidate_layers(bad, 5)


def test_moments_merge_matches_float64_covariance():
  rng = np.random.default_rng(0)
  chunks = [rng.normal(0, 1, (n, 5)) * [1, 2, 3, 900, 0.1] + [0, 0, 0, 3000, 0]
            for n in (3, 40, 200)]
  m = locate.Moments()
  for c in chunks:
    x = c.astype(np.float32)
    mean = x.mean(0)
    m.add(len(x), mean, (x - mean).T @ (x - mean))
  ref = np.concatenate(chunks).astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(m.mean, ref.mean(0), rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(m.cov, np.cov(ref.T, bias=True), rtol=1e-4, atol=1e-4)


def test_score_is_the_weighted_sum_of_z_scores():
  rows = [{"layer": l, "erank": e, "curvature": c, "compactness": 0.5, "stiffness": s}
          for l, e, c, s in [(1, 10.0, 0.2, 0.9), (2, 20.0, 0.1, 0.5), (3, 30.0, 0.3, 0.1)]]
  best = locate.score_layers(rows, {"stiffness": 1.0, "erank": -1.0, "curvature": -2.0})
  z = lambda v: (np.array(v) - np.mean(v)) / np.std(v)
  expected = z([0.9, 0.5, 0.1]) - z([10, 20, 30]) - 2 * z([0.2, 0.1, 0.3])
  np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-12)
  assert best == 1 + int(np.argmax(expected))
  assert all(r["z_compactness"] == 0.0 for r in rows)  # constant proxy: z = 0
  with pytest.raises(UserInputError, match="unknown proxy"):
    locate.score_layers(rows, {"sharpness": 1.0})


def test_paper_score_form_is_curvature_plus_stiffness_minus_erank():
  rows = [{"layer": l, "erank": e, "curvature": c, "compactness": k, "stiffness": s}
          for l, e, c, k, s in [(1, 10.0, 0.2, 0.3, 0.9), (2, 20.0, 0.9, 0.1, 0.5),
                                (3, 30.0, 0.3, 0.2, 0.1), (4, 15.0, 0.8, 0.9, 0.6)]]
  config = load_config("tiny_llama")
  config.locate.score = "paper"
  best = locate.score_layers(rows, locate.score_weights(config))
  z = lambda v: (np.array(v) - np.mean(v)) / np.std(v)
  expected = z([0.2, 0.9, 0.3, 0.8]) + z([0.9, 0.5, 0.1, 0.6]) - z([10, 20, 30, 15])
  np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-12)
  assert best == 1 + int(np.argmax(expected))
  config.locate.score = "weights"
  assert locate.score_weights(config) == dict(config.locate.weights)
  config.locate.score = "mine"
  with pytest.raises(UserInputError, match="locate.score='mine'"):
    locate.score_weights(config)


@pytest.mark.slow
def test_collect_moments_and_reservoir_match_the_model(tiny_checkpoints):
  mesh = make_mesh({"data": 1})
  model = load_model(tiny_checkpoints["tiny_llama"], mesh=mesh, rules=DEFAULT_RULES)
  tokens = np.random.default_rng(0).integers(0, 307, (3, 4, 17)).astype(np.int32)
  moments, points, seen = locate.collect(
      model, [{"tokens": t} for t in tokens], [0, 2], num_batches=3, reservoir=20, seed=5,
      mesh=mesh, rules=DEFAULT_RULES, progress=False)
  assert seen == 3 * 4 * 16
  for layer in (0, 2):
    h = np.concatenate([np.asarray(model.lower(jnp.asarray(t), layer))[:, 1:].reshape(-1, 60)
                        for t in tokens]).astype(np.float64)
    np.testing.assert_allclose(moments[layer].mean, h.mean(0), atol=1e-5)
    np.testing.assert_allclose(moments[layer].cov, np.cov(h.T, bias=True), atol=1e-5)
    chosen = np.sort(np.random.default_rng(5).choice(len(h), 20, replace=False))
    np.testing.assert_allclose(points[layer], h[chosen], atol=1e-5)


def _small(config, tmp_path):
  config.locate.num_tokens = 4032
  config.locate.reservoir = 512
  config.locate.anchors = 64
  config.locate.pairs = 1024
  config.data.cache_dir = str(tmp_path / "cache")
  return config


@pytest.mark.slow
def test_run_locate_report_and_eight_devices_agree(tmp_path):
  one = _small(load_config("tiny_llama"), tmp_path)
  one.mesh.data = 1
  eight = _small(load_config("tiny_llama"), tmp_path)  # data=-1: all 8 simulated devices
  a = locate.run_locate(one, tmp_path / "w", progress=False)
  b = locate.run_locate(eight, tmp_path / "w", progress=False)
  assert a["candidates"] == [1, 2] and a["num_tokens"] == 4032
  assert a["selected_layer"] == b["selected_layer"]
  for ra, rb in zip(a["layers"], b["layers"]):
    for key in ("erank", "erank_raw", "curvature", "compactness", "stiffness", "score"):
      np.testing.assert_allclose(ra[key], rb[key], rtol=2e-3, atol=2e-3, err_msg=key)
  for row in a["layers"]:
    assert {"z_erank", "z_curvature", "z_compactness", "z_stiffness"} <= set(row)


def _dihal_locate(tmp_path, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "locate", "--config=configs/tiny_llama.py",
       f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.locate.num_tokens=2016",
       "--config.locate.reservoir=256", "--config.locate.anchors=32",
       f"--workdir={tmp_path / 'work'}", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dihal_locate_writes_report_and_plot(tmp_path):
  proc = _dihal_locate(tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "work" / "report.json").read_text())
  assert report["selected_layer"] in (1, 2) and len(report["layers"]) == 2
  assert (tmp_path / "work" / "geometry.png").stat().st_size > 10_000
  assert "selected layer" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["--config.locate.layers=7"], "locate.layers"),
    (["--config.locate.reservoir=5000"], "locate.reservoir"),
    (["--config.locate.num_tokens=10"], "locate.num_tokens"),
    (["--config.locate.k=300"], "locate.k=300"),
    (["--config.locate.score=best"], "locate.score"),
])
def test_dihal_locate_bad_input_exits_2(tmp_path, overrides, message):
  proc = _dihal_locate(tmp_path, *overrides)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
  assert last.startswith("dihal: error:") and message in last and "Traceback" not in proc.stderr
  assert not (tmp_path / "work" / "report.json").exists()
