"""`dihal sweep`: ρ and proposed weights vs scipy on hand-made rows; the sweep end to end."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from conftest import load_config
from dihal_jax.errors import UserInputError
from dihal_jax.eval import sweep

PROXIES = ("erank", "curvature", "compactness", "stiffness")


def _rows(loss, score=None, **proxies):
  """Per-layer rows as run_sweep builds them; z_<proxy> z-scored across the rows."""
  rows = []
  for i, value in enumerate(loss):
    row = {"layer": i + 1, "val_loss": float(value)}
    for name in PROXIES:
      row[name] = row[f"{name}_raw"] = float(proxies[name][i])
    rows.append(row)
  for name in PROXIES:
    v = np.array(proxies[name], np.float64)
    z = (v - v.mean()) / v.std() if v.std() > 0 else np.zeros_like(v)
    for row, zi in zip(rows, z):
      row[f"z_{name}"] = float(zi)
  for row, s in zip(rows, score):
    row["score"] = float(s)
  return rows


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  for n in (2, 3, 5, 9):
    x, y = rng.normal(size=n), rng.integers(0, 3, n).astype(float)
    y[:2] = [0.0, 1.0]  # never constant
    if n > 2:
      x[-1] = x[0]  # a tie
    assert math.isclose(sweep.spearman(x, y), stats.spearmanr(x, y).statistic, abs_tol=1e-12)
  assert sweep.spearman([1, 2, 3], [5, 5, 5]) is None  # constant side: undefined
  assert sweep.spearman([1], [2]) is None


def test_permutation_p_is_exact():
  assert sweep.permutation_p([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(2 / 24)
  assert sweep.permutation_p([1, 2], [1, 2]) == 1.0
  x, y = [0.1, 0.5, 0.2, 0.9, 0.7], [3.0, 1.0, 2.0, 5.0, 4.0]
  exact = stats.permutation_test((y,), lambda a: stats.spearmanr(x, a).statistic,
                                 permutation_type="pairings", alternative="two-sided")
  assert sweep.permutation_p(x, y) == pytest.approx(exact.pvalue)


def test_correlate_known_answer_and_proposed_weights():
  stiffness = [0.9, 0.2, 0.6, 0.4, 0.8]
  loss = [-s for s in stiffness]  # exactly -stiffness: ρ_stiffness = -1
  proxies = dict(stiffness=stiffness, erank=[3.0, 1.0, 4.0, 1.5, 9.0],
                 curvature=[0.3, 0.1, 0.2, 0.5, 0.4], compactness=[1.0] * 5)
  score = [2.0, -1.0, 0.5, 0.0, 1.0]
  rows = _rows(loss, score, **proxies)
  rows.append({"layer": 0, "val_loss": 7.0, "score": None,
               **{k: None for k in rows[0] if k not in ("layer", "val_loss", "score")}})
  c = sweep.correlate(rows, {"stiffness": 1.0})
  assert c["n"] == 5 and 0 not in c["layers"]  # layer 0 (no score) left out
  assert c["proxies"]["stiffness"]["rho"] == pytest.approx(-1.0)
  assert c["proposed_weights"]["stiffness"] == pytest.approx(1.0)
  assert c["proxies"]["compactness"]["rho"] is None  # constant: undefined, weight 0
  assert c["proposed_weights"]["compactness"] == 0.0
  for name in ("erank", "curvature", "stiffness", "erank_raw"):
    ref = stats.spearmanr(proxies[name.removesuffix("_raw")], loss).statistic
    assert c["proxies"][name]["rho"] == pytest.approx(ref, abs=1e-12)
    if name in PROXIES:
      assert c["proposed_weights"][name] == pytest.approx(-ref, abs=1e-12)
  assert c["score"]["rho"] == pytest.approx(stats.spearmanr(score, loss).statistic, abs=1e-12)
  combined = [sum(c["proposed_weights"][p] * r[f"z_{p}"] for p in PROXIES) for r in rows[:5]]
  assert c["proposed"]["rho"] == pytest.approx(stats.spearmanr(combined, loss).statistic,
                                               abs=1e-12)
  assert c["proposed"]["rho"] < 0  # the proposal is predictive in-sample by construction
  json.dumps(c)


def test_parse_layers():
  assert sweep.parse_layers("2,0-1,2") == [0, 1, 2]
  for bad in ("", "a", "1,,2"):
    with pytest.raises(UserInputError, match="--layers"):
      sweep.parse_layers(bad)


def _tiny(tmp_path):
  config = load_config("tiny_llama")
  config.data.cache_dir = str(tmp_path / "cache")
  config.locate.num_tokens = 4032
  config.locate.reservoir = 512
  config.locate.anchors = 64
  config.locate.pairs = 1024
  config.locate.layers = "1"  # the sweep must extend it to cover layer 2
  t = config.train
  t.steps, t.batch_size, t.cache_windows, t.val_windows = 12, 8, 32, 8
  t.val_every, t.log_every, t.checkpoint_every, t.warmup_steps = 6, 1, 12, 2
  u = config.bridge.unet
  u.channels, u.heads, u.groups = 16, 2, 4
  u.channel_mults, u.blocks_per_level, u.attention_levels = (1, 2), 1, (1,)  # compiles faster
  return config


def test_bad_layer_is_refused(tmp_path):
  with pytest.raises(UserInputError, match="trainable 0..2"):
    sweep.run_sweep(_tiny(tmp_path), tmp_path / "w", [1, 3], progress=False)


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path):
  config = _tiny(tmp_path)
  workdir = tmp_path / "w"
  report = sweep.run_sweep(config, workdir, [0, 1, 2], progress=False)
  json.dumps(report)
  rows = report["layers"]
  assert [r["layer"] for r in rows] == [0, 1, 2]
  assert all(np.isfinite(r["val_loss"]) for r in rows)
  assert rows[0]["score"] is None and all(r["score"] is not None for r in rows[1:])
  assert report["locate"]["reran"] and report["locate"]["candidates"] == [1, 2]
  assert [r["val_steps"] for r in rows] == [[6, 12]] * 3
  metrics = [json.loads(l) for l in (workdir / "layer_2" / "metrics.jsonl").read_text().splitlines()]
  val = [m["val_loss"] for m in metrics if "val_loss" in m]
  assert rows[2]["val_loss"] == pytest.approx(np.mean(val[-2:]))
  c = report["correlation"]
  assert -1.0 <= c["score"]["rho"] <= 1.0
  scored = [r for r in rows if r["score"] is not None]
  ref = stats.spearmanr([r["score"] for r in scored], [r["val_loss"] for r in scored]).statistic
  assert c["score"]["rho"] == pytest.approx(ref, abs=1e-12)
  assert report["best_layer"] == min(rows, key=lambda r: r["val_loss"])["layer"]
  assert "ρ(score, val_loss)" in sweep.summary(report) and report["verdict"]
  sweep.plot(report, tmp_path / "sweep.png")
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
  again = sweep.run_sweep(config, workdir, [2], progress=False)  # cached: no locate, no training
  assert not again["locate"]["reran"] and again["correlation"]["score"]["rho"] is None
  assert again["layers"][0]["val_loss"] == rows[2]["val_loss"]
  assert "no verdict" in again["verdict"]
