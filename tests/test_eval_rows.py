"""The table of `dihal eval`'s generated rows: every entry can be sampled, on its own stream."""

from dihal_jax.eval.evaluate import METHODS, MODEL_LOADERS
from dihal_jax.eval.rows import BRIDGES, ROWS
from dihal_jax.hybrid.readout import MODES


def test_every_readout_mode_has_a_bridge_row():
  assert {f"dihal_{mode}" for mode in MODES} <= set(ROWS)
  for mode in MODES:
    assert ROWS[f"dihal_{mode}"].mode == mode


def test_rows_have_distinct_random_streams():
  streams = [row.stream for row in ROWS.values()]
  assert len(set(streams)) == len(streams)


def test_every_sampled_model_has_a_loader():
  models = {row.model for row in ROWS.values()} - {None}
  assert models <= set(MODEL_LOADERS) and set(BRIDGES) <= set(MODEL_LOADERS)


def test_methods_are_the_window_rows_then_the_table():
  assert METHODS[:3] == ("real_text", "oracle", "oracle_lm_head")
  assert METHODS[3:] == tuple(ROWS)
