"""`dihal sweep`: ρ and proposed weights vs scipy on hand-made rows; the sweep end to end."""

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import REPO, error_line, load_config
from dihal_jax.errors import UserInputError
from dihal_jax.eval import sweep

PROXIES = ("erank", "curvature", "compactness", "stiffness")


def _rows(loss_per_seed, **proxies):
  """Per-layer rows as run_sweep builds them: z_<proxy> z-scored across the rows, score =
  the default weights' sum, every seed's criteria."""
  rows = []
  for i, losses in enumerate(loss_per_seed):
    row = {"layer": i + 1, "seeds": [{"val_loss": float(v), "recovery_t0.3": -float(v)}
                                     for v in losses]}
    rows.append(row)
  for name in PROXIES:
    v = np.array(proxies[name], np.float64)
    z = (v - v.mean()) / v.std() if v.std() > 0 else np.zeros_like(v)
    for row, zi in zip(rows, z):
      row[name], row[f"z_{name}"] = float(v[rows.index(row)]), float(zi)
  for row in rows:
    row["score"] = sweep.form_score(row, {"stiffness": 1.0})
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


def _enumerated_p(x, y):
  """Two-sided p of Spearman ρ over every ordering of y (independent of scipy's test)."""
  x, y = stats.rankdata(x), stats.rankdata(y)
  observed = abs(np.corrcoef(x, y)[0, 1])
  perms = np.array(list(itertools.permutations(y)))
  rhos = np.abs([np.corrcoef(x, p)[0, 1] for p in perms]) if len(perms) < 50_000 else \
      np.abs(((perms - perms.mean(1, keepdims=True)) @ (x - x.mean()))
             / (np.linalg.norm(perms - perms.mean(1, keepdims=True), axis=1)
                * np.linalg.norm(x - x.mean())))
  return float(np.mean(rhos >= observed - 1e-12))


def test_permutation_p_exact_and_monte_carlo():
  assert sweep.permutation_p([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(2 / 24)
  assert sweep.permutation_p([1, 2], [1, 2]) == 1.0
  x, y = [0.1, 0.5, 0.2, 0.9, 0.7], [3.0, 1.0, 2.0, 5.0, 4.0]
  assert sweep.permutation_p(x, y) == pytest.approx(_enumerated_p(x, y))
  # n = 9 > EXACT_P_MAX_N: Monte Carlo, within its sampling error of every ordering's p.
  rng = np.random.default_rng(3)
  x = rng.normal(size=9)
  y = x + rng.normal(scale=1.5, size=9)
  exact = _enumerated_p(x, y)
  assert 0.02 < exact < 0.98
  assert sweep.permutation_p(x, y) == pytest.approx(exact, abs=0.02)


def _hierarchical_bootstrap(score, per_seed, resamples=4000, seed=7):
  """Percentile interval of ρ: layers drawn with replacement, then each drawn layer's seeds."""
  rng = np.random.default_rng(seed)
  n, s = per_seed.shape
  rhos = []
  for _ in range(resamples):
    i = rng.integers(0, n, n)
    means = per_seed[i[:, None], rng.integers(0, s, (n, s))].mean(1)
    if np.ptp(score[i]) > 0 and np.ptp(means) > 0:
      rhos.append(stats.spearmanr(score[i], means).statistic)
  return np.percentile(rhos, [2.5, 97.5])


def test_bootstrap_ci_matches_an_independent_hierarchical_bootstrap():
  rng = np.random.default_rng(0)
  score = np.arange(12, dtype=float)
  per_seed = -0.15 * score[:, None] + rng.normal(size=(12, 3))  # noisy, negative trend
  ci = sweep.bootstrap_ci(score, per_seed)
  ref = _hierarchical_bootstrap(score, per_seed)
  assert ci[0] < ci[1]
  assert ci == pytest.approx(list(ref), abs=0.08)
  # The seeds are resampled too: means that follow the score exactly give ρ = -1 in every
  # layer resample, so only the seeds' spread can widen the interval.
  spread = np.array([-1.0, 0.0, 1.0]) * 4.0
  exact = -0.15 * score[:, None] + spread  # per-layer means = -0.15 score exactly
  assert sweep.bootstrap_ci(score, exact.mean(1, keepdims=True).repeat(3, 1)) == pytest.approx(
      [-1.0, -1.0])
  wide = sweep.bootstrap_ci(score, exact)
  assert wide[1] - wide[0] > 0.3
  assert wide == pytest.approx(list(_hierarchical_bootstrap(score, exact)), abs=0.1)
  assert sweep.bootstrap_ci(score, np.zeros((12, 3))) is None  # constant: undefined


def test_score_forms():
  forms = sweep.score_forms({"stiffness": 2.0}, fitted_elsewhere={"erank": -0.5})
  patterns = [k for k in forms if k.startswith(("+", "-"))]
  assert len(patterns) == 8 and len({frozenset(forms[k].items()) for k in patterns}) == 8
  assert forms["+curvature+stiffness-erank"] == forms["paper"] == {
      "curvature": 1.0, "stiffness": 1.0, "erank": -1.0}
  assert forms["weights"] == {"stiffness": 2.0} and forms["curvature"] == {"curvature": 1.0}
  assert forms["fitted_elsewhere"] == {"erank": -0.5}


def test_correlate_known_answer_picks_and_proposed_weights():
  stiffness = [0.9, 0.2, 0.6, 0.4, 0.8, 0.1]
  losses = [[-s + d for d in (-0.01, 0.0, 0.01)] for s in stiffness]  # mean exactly -stiffness
  proxies = dict(stiffness=stiffness, erank=[3.0, 1.0, 4.0, 1.5, 9.0, 2.0],
                 curvature=[0.3, 0.1, 0.2, 0.5, 0.4, 0.6], compactness=[1.0] * 6)
  rows = _rows(losses, **proxies)
  rows.append({"layer": 0, "score": None, "seeds": [{"val_loss": 7.0, "recovery_t0.3": 0.0}]})
  c = sweep.correlate(rows, sweep.score_forms({"stiffness": 1.0}), ["val_loss", "recovery_t0.3"])
  assert c["n"] == 6 and 0 not in c["layers"]  # layer 0 (no score) left out
  mean_loss = np.mean(losses, axis=1)
  for name in ("erank", "curvature", "stiffness"):
    ref = stats.spearmanr(proxies[name], mean_loss).statistic
    assert c["rho"][name]["val_loss"]["rho"] == pytest.approx(ref, abs=1e-12)
    assert c["rho"][name]["recovery_t0.3"]["rho"] == pytest.approx(-ref, abs=1e-12)
    assert c["proposed_weights"][name] == pytest.approx(-ref, abs=1e-12)
  assert c["rho"]["stiffness"]["val_loss"]["rho"] == pytest.approx(-1.0)
  assert c["rho"]["compactness"]["val_loss"]["rho"] is None  # constant: undefined, weight 0
  assert c["proposed_weights"]["compactness"] == 0.0
  paper = [r["z_curvature"] + r["z_stiffness"] - r["z_erank"] for r in rows[:6]]
  assert c["rho"]["paper"]["val_loss"]["rho"] == pytest.approx(
      stats.spearmanr(paper, mean_loss).statistic, abs=1e-12)
  # stiffness ranks the layers exactly as the loss does: argmax = argmin loss, top 3 shared
  best = rows[int(np.argmin(mean_loss))]["layer"]
  assert c["picks"]["stiffness"] == {"argmax_layer": best, "equals_argmin_loss": True,
                                     "top3": [1, 5, 3], "top3_overlap": 3}
  assert c["rho"]["proposed_in_sample"]["val_loss"]["rho"] < 0  # predictive in-sample
  entry = c["rho"]["stiffness"]["val_loss"]
  assert entry["p"] == pytest.approx(_enumerated_p(stiffness, mean_loss))
  # Seeds never reorder distinct layers here; only a layer drawn twice (tied score, two
  # seed draws) moves ρ off -1.
  assert entry["ci"][0] == pytest.approx(-1.0) and -1.0 < entry["ci"][1] < -0.8
  json.dumps(c)


def test_layer_row_means_and_sds():
  runs = [{"val_loss": v, "recovery_t0.3": r, "joint_oracle": 0.9}
          for v, r in ((1.0, 0.2), (1.2, 0.4), (0.8, 0.9))]
  geometry = {"score": 1.5, "z_curvature": 0.5, "z_stiffness": 1.0, "z_erank": 2.0}
  row = sweep.layer_row(4, geometry, runs, ["val_loss", "recovery_t0.3"])
  assert row["score_paper"] == pytest.approx(0.5 + 1.0 - 2.0)
  assert row["val_loss_mean"] == pytest.approx(1.0)
  assert row["val_loss_sd"] == pytest.approx(np.std([1.0, 1.2, 0.8], ddof=1))
  assert row["recovery_t0.3"] == pytest.approx(0.5)
  assert row["recovery_t0.3_sd"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
  assert sweep.layer_row(0, {}, runs, ["val_loss"])["score_paper"] is None


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
  t.batch_size, t.cache_windows, t.val_windows = 8, 32, 8  # the protocol: 32 / 8 = 4 steps
  t.val_every, t.log_every, t.checkpoint_every, t.warmup_steps = 2, 1, 4, 1
  config.sweep.seeds, config.sweep.eval_windows = 2, 8
  u = config.bridge.unet
  u.channels, u.heads, u.groups = 16, 2, 4
  u.channel_mults, u.blocks_per_level, u.attention_levels = (1, 2), 1, (1,)  # compiles faster
  return config


def test_bad_layer_is_refused(tmp_path):
  with pytest.raises(UserInputError, match="trainable 0..2"):
    sweep.run_sweep(_tiny(tmp_path), tmp_path / "w", [1, 3], progress=False)


def test_bad_sweep_settings_are_refused(tmp_path):
  (tmp_path / "other.json").write_text('{"layers": []}')
  cases = [({"sweep.seeds": 0}, "sweep"), ({"sweep.epochs": 0.0}, "sweep"),
           ({"sweep.eval_windows": 9}, "eval_windows"), ({"sweep.noise_levels": (0.0,)},
                                                         "noise_levels"),
           ({"train.warmup_steps": 4}, "warmup_steps"),  # the protocol has 32 / 8 = 4 steps
           ({"sweep.fitted_from": str(tmp_path / "missing.json")}, "fitted_from"),
           ({"sweep.fitted_from": str(tmp_path / "other.json")}, "proposed_weights")]
  for overrides, match in cases:
    config = _tiny(tmp_path)
    for path, value in overrides.items():
      section, name = path.split(".")
      config[section][name] = value
    with pytest.raises(UserInputError, match=match):
      sweep.check(config)


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [
    ("--config.sweep.eval_windows=999", "sweep.eval_windows=999"),
    ("--config.sweep.fitted_from=/nonexistent/report.json", "sweep.fitted_from"),
    ("--config.locate.score=best", "locate.score"),
])
def test_dihal_sweep_bad_input_exits_2(tmp_path, flag, message):
  result = subprocess.run([sys.executable, "-m", "dihal_jax.cli", "sweep",
                           "--config=configs/tiny_llama.py", f"--workdir={tmp_path / 'w'}",
                           "--layers=1", flag], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert message in error_line(result)
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path):
  """Two layers x two seeds: the contract's fields, each value read back from its run, ρ vs
  scipy; a rerun trains nothing and judges another sweep's weights (sweep.fitted_from)."""
  config = _tiny(tmp_path)
  workdir = tmp_path / "w"
  report = sweep.run_sweep(config, workdir, [1, 2], progress=False)
  json.dumps(report)
  rows = report["layers"]
  assert [r["layer"] for r in rows] == [1, 2] and report["protocol"]["steps"] == 4
  assert report["locate"]["reran"] and report["locate"]["candidates"] == [1, 2]
  for row in rows:
    assert [s["seed"] for s in row["seeds"]] == [0, 1]
    for s, run in enumerate(row["seeds"]):
      metrics = [json.loads(l) for l in (workdir / f"layer_{row['layer']}" / f"seed_{s}" /
                                         "metrics.jsonl").read_text().splitlines()]
      val = [m["val_loss"] for m in metrics if "val_loss" in m]
      assert run["val_loss"] == pytest.approx(np.mean(val[-2:])) and run["val_steps"] == [2, 4]
      for key in ("recovery_t0.3", "recovery_t0.8", "joint_recovery_t0.3", "joint_oracle"):
        assert 0.0 <= run[key] <= 1.0
    assert row["val_loss_mean"] == pytest.approx(np.mean([s["val_loss"] for s in row["seeds"]]))
    assert row["score"] is not None and row["score_paper"] is not None
  assert rows[0]["seeds"][0]["val_loss"] != rows[0]["seeds"][1]["val_loss"]  # seeds differ
  for name in ("weights", "paper", "stiffness", "+curvature+stiffness-erank"):
    for criterion in report["criteria"]:
      assert set(report["rho"][name][criterion]) == {"rho", "ci", "p"}
  means = [r["val_loss_mean"] for r in rows]
  assert report["rho"]["weights"]["val_loss"]["rho"] == pytest.approx(
      stats.spearmanr([r["score"] for r in rows], means).statistic)
  assert report["argmin_loss_layer"] == rows[int(np.argmin(means))]["layer"]
  assert "Spearman ρ" in sweep.summary(report) and report["verdict"]
  sweep.plot(report, tmp_path / "sweep.png")
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
  reports_path = tmp_path / "first.json"
  reports_path.write_text(json.dumps(report))
  stamp = (workdir / "layer_2" / "seed_1" / "criteria.json").stat().st_mtime_ns
  config.sweep.fitted_from = str(reports_path)
  again = sweep.run_sweep(config, workdir, [1, 2], progress=False)  # cached: nothing trains
  assert not again["locate"]["reran"]
  assert (workdir / "layer_2" / "seed_1" / "criteria.json").stat().st_mtime_ns == stamp
  assert again["layers"][1]["seeds"] == rows[1]["seeds"]
  assert again["forms"]["fitted_elsewhere"] == report["proposed_weights"]
  assert again["rho"]["fitted_elsewhere"]["val_loss"]["rho"] == pytest.approx(
      report["rho"]["proposed_in_sample"]["val_loss"]["rho"])  # same layers: same ranking
