"""Hidden-state streams: token batches -> h_l of chosen layers, laid out along `data`.

Only the lower layers that are needed run (`Decoder.hidden_states` stops at
the deepest requested layer). Per-channel mean/std of each layer are
accumulated in the same pass (float64, Chan et al.'s parallel update),
position 0 excluded by default (its state is a constant with a huge norm).

`cache_hidden_states` stores a fixed set of windows' states on disk, keyed by
a hash of the model (config.json, weight-file headers, sizes, mtimes), the
data (tfds config, split, window, count), the layers and the dtype; any
change gives a new key, i.e. a fresh computation. A cache directory is
written under a temporary name and renamed when complete, so a killed run
never leaves a cache that looks finished. With several processes each one
computes its rows of every batch, gathers the whole batch and writes its own
complete copy (hosts of a pod have separate disks; on a shared disk the first
rename wins).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grain
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dihal_jax.backbone.model import Decoder
from dihal_jax.data.pipeline import process_rows
from dihal_jax.files import publish_dir
from dihal_jax.parallel.sharding import Rules, batch_sharding


class ChannelStats:
  """Streaming per-channel mean and variance in float64."""

  def __init__(self, dim: int):
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.m2 = np.zeros(dim, np.float64)

  def update(self, x: np.ndarray):
    """Adds rows x [N, D]."""
    x = np.asarray(x, np.float64).reshape(-1, self.mean.shape[0])
    n = x.shape[0]
    if n == 0:
      return
    mean = x.mean(0)
    m2 = ((x - mean) ** 2).sum(0)
    total = self.count + n
    delta = mean - self.mean
    self.mean = self.mean + delta * (n / total)
    self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
    self.count = total

  @property
  def std(self) -> np.ndarray:
    return np.sqrt(self.m2 / max(self.count, 1))

  def to_dict(self) -> dict:
    return {"count": self.count, "mean": self.mean.tolist(), "std": self.std.tolist()}


def hidden_fn(model: Decoder, layers: Sequence[int], mesh: jax.sharding.Mesh, rules: Rules):
  """A jitted tokens [B, T] -> {l: h_l [B, T, D]}, inputs and outputs sharded along batch."""
  graphdef, state = nnx.split(model)
  layers = tuple(sorted(set(int(l) for l in layers)))
  tokens_sharding = batch_sharding(mesh, rules, 2)
  out_sharding = {l: batch_sharding(mesh, rules, 3) for l in layers}

  @jax.jit
  def run(state, tokens):
    out = nnx.merge(graphdef, state).hidden_states(tokens, layers)
    return jax.lax.with_sharding_constraint(out, out_sharding)

  def apply(local_tokens: np.ndarray):
    tokens = jax.make_array_from_process_local_data(tokens_sharding, np.asarray(local_tokens))
    return tokens, run(state, tokens)

  return apply


def hidden_stream(model: Decoder, batches: Iterable[dict], layers: Sequence[int], *,
                  mesh: jax.sharding.Mesh,
                  rules: Rules) -> Iterator[tuple[jax.Array, dict[int, jax.Array]]]:
  """Yields (tokens, {l: h_l}) per batch of {"tokens": [B_local, T]}."""
  apply = hidden_fn(model, layers, mesh, rules)
  for batch in batches:
    yield apply(batch["tokens"])


def global_value(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike) -> str:
  """Identity of an HF checkpoint: config.json, weight files' headers, sizes and mtimes."""
  digest = hashlib.sha256()
  ckpt_dir = Path(ckpt_dir)
  digest.update((ckpt_dir / "config.json").read_bytes())
  for path in sorted(ckpt_dir.glob("*.safetensors")):
    st = path.stat()
    with open(path, "rb") as f:
      header_len = int.from_bytes(f.read(8), "little")
      digest.update(f.read(min(header_len, 1 << 24)))
    digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return digest.hexdigest()


def cache_key(**fields) -> str:
  """Stable short hash of the JSON of `fields` (model, data, layers, dtype...)."""
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_hidden_states(model: Decoder, windows: np.ndarray, layers: Sequence[int], *,
                        mesh: jax.sharding.Mesh, rules: Rules, batch_size: int,
                        cache_root: str | os.PathLike, key_fields: dict,
                        exclude_first: bool = True) -> Path:
  """Computes (or finds) h_l of `windows` [N, T] for each layer; returns the cache directory.

  Layout: tokens.npy [N, T] int32, layer_{l}.npy [N, T, D] float32, stats.json
  ({l: {count, mean, std}}), meta.json (the key fields). N is cut to a
  multiple of batch_size.
  """
  layers = sorted(set(int(l) for l in layers))
  n = (len(windows) // batch_size) * batch_size
  key = cache_key(layers=layers, n=n, window=int(windows.shape[1]), dtype=str(model.dtype),
                  exclude_first=exclude_first, **key_fields)
  final = Path(cache_root) / key
  if (final / "meta.json").is_file():
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
  try:
    d = model.cfg.hidden_size
    np.save(tmp / "tokens.npy", windows[:n].astype(np.int32))
    arrays = {l: np.lib.format.open_memmap(tmp / f"layer_{l}.npy", mode="w+", dtype=np.float32,
                                           shape=(n, windows.shape[1], d)) for l in layers}
    stats = {l: ChannelStats(d) for l in layers}
    rows = process_rows(jax.process_index(), jax.process_count(), batch_size)
    batches = ({"tokens": windows[i:i + batch_size][rows]} for i in range(0, n, batch_size))
    stream = hidden_stream(model, batches, layers, mesh=mesh, rules=rules)
    start = 1 if exclude_first else 0
    for i, (_, hidden) in enumerate(stream):
      for l in layers:
        h = global_value(hidden[l])
        arrays[l][i * batch_size:(i + 1) * batch_size] = h
        stats[l].update(h[:, start:])
    for array in arrays.values():
      array.flush()
    (tmp / "stats.json").write_text(json.dumps({str(l): s.to_dict() for l, s in stats.items()}))
    (tmp / "meta.json").write_text(json.dumps({"key": key, **key_fields, "layers": layers,
                                               "n": n}, default=str, indent=2))
    publish_dir(tmp, final, "meta.json")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


class CachedLayer:
  """grain random-access source over one cached layer: record i = {"h": [T, D], "tokens": [T]}.

  The arrays are memory-mapped lazily, so the source pickles as two paths.
  """

  def __init__(self, cache_dir: str | os.PathLike, layer: int):
    self.h_path = Path(cache_dir) / f"layer_{int(layer)}.npy"
    self.tokens_path = Path(cache_dir) / "tokens.npy"
    if not self.h_path.is_file():
      raise FileNotFoundError(f"{self.h_path}: layer {layer} is not in this cache")
    self._h = self._tokens = None

  def _open(self):
    if self._h is None:
      self._h = np.load(self.h_path, mmap_mode="r")
      self._tokens = np.load(self.tokens_path, mmap_mode="r")

  def __len__(self) -> int:
    self._open()
    return len(self._h)

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Records `indices` stacked: {"h": [k, T, D], "tokens": [k, T]}."""
    self._open()
    return {"h": np.stack([self._h[i] for i in indices]),
            "tokens": np.stack([self._tokens[i] for i in indices])}

  def __getstate__(self):
    return {"h_path": self.h_path, "tokens_path": self.tokens_path, "_h": None, "_tokens": None}


def cached_batches(cache_dir: str | os.PathLike, layer: int, *, batch_size: int, seed: int,
                   shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Seeded, endlessly repeated, checkpointable batches {"h": [B/P, T, D], "tokens": [B/P, T]}:
  process shard_index of P = shard_count reads only its rows of each global batch of B."""
  source = CachedLayer(cache_dir, layer)
  rows = process_rows(shard_index, shard_count, batch_size)
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  ds = ds.batch(batch_size, drop_remainder=True).map(lambda indices: indices[rows])
  return ds.map(source.rows).to_iter_dataset()
