"""SIGTERM inside a pipeline's training stage (the stage saved and reported `interrupted`):
the pipeline stops there with `TrainingInterrupted` naming the stage, nothing after it runs,
and the CLI turns that into one line and exit status 0. The training itself is replaced by
a stub that reports the interruption, so each pipeline's own handling is what is tested."""

import pytest

from conftest import load_config
from dihal_jax import cli
from dihal_jax.bridge.training_loop import TrainingInterrupted
from dihal_jax.eval import ablation, evaluate, sweep
from dihal_jax.eval.rows import RowGenerators


def _stub(calls):
  def train(config, workdir, progress=True):
    calls.append(workdir.name)
    return {"interrupted": True, "steps": 3}
  return train


def test_the_ablation_stops_at_the_interrupted_row(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(ablation, "run_train", _stub(calls))
  config = load_config("tiny_llama")
  chosen = {name: ablation.ROWS[name] for name in ("unet_scratch", "transformer_scratch")}
  with pytest.raises(TrainingInterrupted, match="the unet_scratch bridge"):
    ablation.train_rows(config, tmp_path, chosen, layer=1, progress=False)
  assert calls == ["unet_scratch"]  # the next row never started


def test_a_sweep_run_stops_the_sweep(monkeypatch, tmp_path):
  from dihal_jax.bridge import train
  calls = []
  monkeypatch.setattr(train, "run_train", _stub(calls))
  with pytest.raises(TrainingInterrupted, match="seed_0"):
    sweep.run_one(load_config("tiny_llama"), tmp_path / "seed_0", probe=None, progress=False)
  assert calls == ["seed_0"] and not (tmp_path / "seed_0" / "criteria.json").exists()


@pytest.mark.parametrize("loader, stage, patched", [
    ("l0", "the l = 0 bridge", "train_with_decoder"),
    ("mdm", "the mdm model", "run_mdm"),
    ("mdm_block", "the mdm_block model", "run_mdm"),
])
def test_eval_stops_when_a_model_it_trains_is_interrupted(monkeypatch, tmp_path, loader,
                                                          stage, patched):
  calls = []
  monkeypatch.setattr(evaluate, patched, _stub(calls))
  gens = RowGenerators.__new__(RowGenerators)  # the loader must fail before touching it
  with pytest.raises(TrainingInterrupted, match=stage):
    evaluate.MODEL_LOADERS[loader](gens, load_config("tiny_llama"), tmp_path, 0, False)
  assert len(calls) == 1


def test_the_cli_reports_an_interruption_as_one_line_and_status_0(capsys):
  def handler(config, workdir):
    raise TrainingInterrupted("the projector")
  assert cli._stoppable(handler)(None, None) == 0
  assert capsys.readouterr().out == ("SIGTERM: stopped while training the projector; "
                                     "the same command resumes\n")
