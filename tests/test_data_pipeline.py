"""grain windows, resumable iterators, hidden-state streams and their cache, `dihal data`."""

import itertools
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import grain
import pytest

from conftest import REPO, load_config
from dihal_jax.backbone.checkpoint import byte_tokenizer
from dihal_jax.backbone.convert import load_model
from dihal_jax.data import hidden, pipeline
from dihal_jax.data.dataset import Data
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

SEP = 0
WORDS = "the quick brown fox jumps over a lazy dog while Emma writes letters".split()


@pytest.fixture(scope="module")
def tokenizer():
  return byte_tokenizer()


@pytest.fixture(scope="module")
def source():
  rng = np.random.default_rng(0)
  return [{"doc_id": f"doc/{i:03d}".encode(),
           "text": (f"[{i}] " + " ".join(rng.choice(WORDS, 40 + 7 * i))).encode()}
          for i in range(12)]


def _windows(source, tokenizer, **kw):
  args = dict(length=33, separator=SEP, batch_size=4, seed=7)
  args.update(kw)
  return pipeline.window_dataset(source, tokenizer, **args)


def test_windows_are_the_token_stream_cut_after_a_separator(source, tokenizer):
  stream = []
  for record in source:  # independent reference: tokenize, join with the separator, cut
    stream += tokenizer(record["text"].decode(), add_special_tokens=False)["input_ids"] + [SEP]
  expected = [[SEP] + stream[i:i + 32] for i in range(0, len(stream) - 31, 32)]
  got = [w["tokens"].tolist() for w in _windows(source, tokenizer, batch_size=None,
                                                  shuffle=False, num_epochs=1)]
  assert got == expected
  stats = pipeline.split_statistics(source, tokenizer, length=33, separator=SEP)
  assert stats == {"documents": 12, "tokens": len(stream), "windows": len(expected)}


def test_same_seed_same_batches_other_seed_other_batches(source, tokenizer):
  take = lambda seed: [b["tokens"] for _, b in zip(range(6), _windows(source, tokenizer, seed=seed))]
  a, b, c = take(1), take(1), take(2)
  assert all((x == y).all() for x, y in zip(a, b))
  assert any((x != y).any() for x, y in zip(a, c))
  assert a[0].shape == (4, 33) and a[0].dtype == np.int32 and (a[0][:, 0] == SEP).all()


def test_iterator_state_resumes_with_exactly_the_next_batch(source, tokenizer):
  it = iter(_windows(source, tokenizer))
  for _ in range(9):  # crosses an epoch boundary (12 docs ~ 8 batches per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(5)]
  resumed = iter(_windows(source, tokenizer))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_iterator_state_round_trips_through_orbax(source, tokenizer, tmp_path):
  it = iter(_windows(source, tokenizer))
  for _ in range(3):
    next(it)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = next(it)["tokens"]
  resumed = iter(_windows(source, tokenizer))
  ocp.CheckpointManager(tmp_path / "ckpt").restore(
      3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  np.testing.assert_array_equal(next(resumed)["tokens"], expected)


def test_process_rows_of_each_batch_make_the_single_process_batch(source, tokenizer):
  """P processes hold consecutive row blocks of the one global batch (process-count invariant)."""
  whole = [b["tokens"] for b in itertools.islice(_windows(source, tokenizer, batch_size=4), 3)]
  parts = [[b["tokens"] for b in itertools.islice(
      _windows(source, tokenizer, batch_size=4, shard_index=i, shard_count=2), 3)]
      for i in range(2)]
  for k in range(3):
    assert parts[0][k].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
  with pytest.raises(UserInputError, match="not divisible by the 3 processes"):
    _windows(source, tokenizer, batch_size=4, shard_index=0, shard_count=3)


def test_channel_stats_match_float64_numpy():
  rng = np.random.default_rng(0)
  chunks = [rng.normal(3.0, 50.0, (n, 6)).astype(np.float32) for n in (1, 17, 250, 3)]
  stats = hidden.ChannelStats(6)
  for c in chunks:
    stats.update(c)
  everything = np.concatenate(chunks).astype(np.float64)
  np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-12, atol=1e-10)
  np.testing.assert_allclose(stats.std, everything.std(0), rtol=1e-10)
  assert stats.count == 271


@pytest.fixture(scope="module")
def tiny_llama(tiny_checkpoints):
  return tiny_checkpoints["tiny_llama"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_hidden_stream_matches_single_device(tiny_llama, mesh_shape):
  mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  model = load_model(tiny_llama, mesh=mesh, rules=DEFAULT_RULES)
  single = load_model(tiny_llama, mesh=make_mesh({"data": 1}), rules=DEFAULT_RULES)
  tokens = np.random.default_rng(0).integers(0, 307, (2, 8, 24)).astype(np.int32)
  stream = hidden.hidden_stream(model, [{"tokens": t} for t in tokens], [3, 1], mesh=mesh,
                                rules=DEFAULT_RULES)
  for (batch_tokens, hs), t in zip(stream, tokens):
    np.testing.assert_array_equal(np.asarray(batch_tokens), t)
    assert sorted(hs) == [1, 3]
    for layer, h in hs.items():
      assert len(h.sharding.device_set) == 8 and h.addressable_shards[0].data.shape[0] < 8
      ref = np.asarray(single.lower(jnp.asarray(t), layer))
      np.testing.assert_allclose(np.asarray(h), ref, atol=1e-5)


@pytest.mark.slow
def test_hidden_cache_hits_and_invalidates(tiny_llama, tmp_path):
  mesh = make_mesh({"data": 1})
  model = load_model(tiny_llama, mesh=mesh, rules=DEFAULT_RULES)
  windows = np.random.default_rng(1).integers(0, 307, (10, 16)).astype(np.int32)
  key = dict(model=hidden.checkpoint_fingerprint(tiny_llama), data="split-a")
  kw = dict(mesh=mesh, rules=DEFAULT_RULES, batch_size=4, cache_root=tmp_path)
  first = hidden.cache_hidden_states(model, windows, [2], key_fields=key, **kw)
  stamp = (first / "layer_2.npy").stat().st_mtime_ns
  again = hidden.cache_hidden_states(model, windows, [2], key_fields=key, **kw)
  assert again == first and (first / "layer_2.npy").stat().st_mtime_ns == stamp  # a hit
  h = np.load(first / "layer_2.npy")
  assert h.shape == (8, 16, 60)  # cut to a multiple of the batch
  np.testing.assert_allclose(h, np.asarray(model.lower(jnp.asarray(windows[:8]), 2)), atol=1e-6)
  stats = json.loads((first / "stats.json").read_text())["2"]
  np.testing.assert_allclose(stats["mean"], h[:, 1:].reshape(-1, 60).astype(np.float64).mean(0),
                             atol=1e-6)
  other_data = hidden.cache_hidden_states(model, windows, [2], key_fields=dict(key, data="b"), **kw)
  other_layer = hidden.cache_hidden_states(model, windows, [1], key_fields=key, **kw)
  assert len({first, other_data, other_layer}) == 3
  assert not list(tmp_path.glob(".*tmp*"))


def test_checkpoint_fingerprint_changes_with_the_weights(tiny_llama, tmp_path):
  import shutil
  copy = tmp_path / "ckpt"
  shutil.copytree(tiny_llama, copy)
  before = hidden.checkpoint_fingerprint(copy)
  config = json.loads((copy / "config.json").read_text())
  config["rms_norm_eps"] = 1e-6
  (copy / "config.json").write_text(json.dumps(config))
  assert hidden.checkpoint_fingerprint(copy) != before


def test_data_from_config_on_a_user_folder(tmp_path):
  folder = tmp_path / "texts"
  for b in range(2):
    _write_book(folder, f"book{b}.txt")
  config = load_config("tiny_llama")
  config.data.dir = str(folder)
  config.data.ood_dir = ""
  config.data.window = 32
  config.data.cache_dir = str(tmp_path / "cache")
  data = Data.from_config(config, tmp_path / "work")
  stats = data.statistics
  assert set(stats) == {"train", "validation", "test"}
  assert sum(s["documents"] for s in stats.values()) == 12
  batch = next(iter(data.windows("train", batch_size=2)))
  assert batch["tokens"].shape == (2, 32)


def test_window_longer_than_max_positions_is_refused(tmp_path):
  config = load_config("tiny_llama")
  config.data.window = 4096  # tiny_llama: max_position_embeddings 2048
  config.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(UserInputError, match="data.window=4096"):
    Data.from_config(config, tmp_path / "work")


def test_corpus_shorter_than_one_window_is_refused(tmp_path):
  folder = tmp_path / "short"
  _write_book(folder, "b.txt", chapters=3, repeat=1)
  config = load_config("tiny_llama")
  config.data.dir = str(folder)
  config.data.ood_dir = ""
  config.data.window = 512
  config.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(UserInputError, match="fewer than one window"):
    Data.from_config(config, tmp_path / "work")


def _dihal_data(tmp_path, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "data", "--config=configs/tiny_llama.py",
       f"--config.data.cache_dir={tmp_path / 'cache'}", f"--workdir={tmp_path / 'work'}",
       *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dihal_data_command_on_the_shipped_corpora(tmp_path):
  proc = _dihal_data(tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "work" / "report.json").read_text())
  splits = report["splits"]
  assert set(splits) == {"train", "validation", "test"}
  assert splits["train"]["documents"] > 5 * splits["test"]["documents"] > 0
  assert report["ood"]["documents"] > 100  # Moby Dick's chapters
  for s in list(splits.values()) + [report["ood"]]:
    assert s["windows"] == s["tokens"] // 63


def _write_book(folder, name, chapters=6, repeat=3):
  folder.mkdir(exist_ok=True)
  body = "\n\n".join(f"CHAPTER {c + 1}\n\n" + " ".join(WORDS * (repeat + c)) for c in range(chapters))
  (folder / name).write_text("Title page\n\n" + body)


@pytest.mark.slow
def test_dihal_data_command_on_a_user_folder(tmp_path):
  for b in range(2):
    _write_book(tmp_path / "mine", f"book{b}.txt")
  proc = _dihal_data(tmp_path, f"--config.data.dir={tmp_path / 'mine'}", "--config.data.ood_dir=",
                     "--config.data.window=32")
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "work" / "report.json").read_text())
  assert sum(s["documents"] for s in report["splits"].values()) == 12 and report["ood"] is None


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "empty", "not_utf8", "too_short", "window_too_long"])
def test_dihal_data_bad_input_exits_2(tmp_path, case):
  folder = tmp_path / "corpus"
  overrides = [f"--config.data.dir={folder}"]
  if case in ("empty", "not_utf8"):
    folder.mkdir()
  if case == "not_utf8":
    (folder / "bad.txt").write_bytes(b"CHAPTER 1\n\xff\xfe bad bytes")
  if case == "too_short":
    _write_book(folder, "tiny.txt", chapters=3, repeat=1)
    overrides += ["--config.data.window=1024", "--config.data.ood_dir="]
  if case == "window_too_long":
    _write_book(folder, "book.txt")
    overrides += ["--config.data.window=4096"]  # tiny_llama: 2048 positions
  proc = _dihal_data(tmp_path, *overrides)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
  assert last.startswith("dihal: error:") and "Traceback" not in proc.stderr
  expected = {"missing": str(folder), "empty": str(folder), "not_utf8": "bad.txt",
              "too_short": "fewer than one window", "window_too_long": "data.window=4096"}[case]
  assert expected in last, last
  assert not (tmp_path / "work" / "report.json").exists()


def test_cached_batches_are_cache_rows_and_resume(tiny_llama, tmp_path):
  import pickle
  mesh = make_mesh({"data": 1})
  model = load_model(tiny_llama, mesh=mesh, rules=DEFAULT_RULES)
  windows = np.random.default_rng(2).integers(0, 307, (12, 8)).astype(np.int32)
  cache = hidden.cache_hidden_states(model, windows, [1], mesh=mesh, rules=DEFAULT_RULES,
                                     batch_size=4, cache_root=tmp_path, key_fields={"d": 1})
  source = pickle.loads(pickle.dumps(hidden.CachedLayer(cache, 1)))
  rows = np.load(cache / "layer_1.npy")
  it = iter(hidden.cached_batches(cache, 1, batch_size=3, seed=0))
  seen = []
  for _ in range(4):  # one epoch of 12 rows
    batch = next(it)
    for h, t in zip(batch["h"], batch["tokens"]):
      i = int(np.flatnonzero((windows == t).all(1))[0])
      np.testing.assert_array_equal(h, rows[i])
      seen.append(i)
  assert sorted(seen) == list(range(12)) and len(source) == 12
  state = it.get_state()
  want = next(it)["h"]
  resumed = iter(hidden.cached_batches(cache, 1, batch_size=3, seed=0))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["h"], want)
  with pytest.raises(FileNotFoundError):
    hidden.CachedLayer(cache, 2)
