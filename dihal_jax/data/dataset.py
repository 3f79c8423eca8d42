"""The data of a config: splits built into tfds, windows through grain, `dihal data`.

Usage:
  data = Data.from_config(config, workdir)       # builds what is missing
  it = iter(data.windows("train", batch_size=16))  # checkpointable grain iterator
  data.statistics                                 # documents / tokens / windows per split
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from dihal_jax.backbone import checkpoint
from dihal_jax.data import corpus, pipeline, tfds_builder, tfds_source
from dihal_jax.errors import UserInputError

OOD = "ood"  # name of the out-of-domain set (its single split is "test")


def cache_root(config: ml_collections.ConfigDict) -> Path:
  if config.data.cache_dir:
    return Path(config.data.cache_dir).expanduser()
  return Path(os.environ.get("DIHAL_CACHE_DIR", Path.home() / ".cache" / "dihal_jax"))


@dataclasses.dataclass
class Data:
  """Random-access split sources plus what is needed to cut them into windows."""

  sources: dict[str, Any]  # "train", "validation", "test", and "ood" (the OOD test split)
  tokenizer: Any
  separator: int
  window: int
  seed: int
  read_threads: int
  corpora: dict[str, dict]  # "in_domain" (and "ood"): source, split rule, rule per file

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> "Data":
    ckpt = checkpoint.checkpoint_dir(config, workdir)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    if tokenizer is None:
      raise UserInputError(f"{ckpt}: the checkpoint has no tokenizer; the data pipeline needs one")
    cfg = checkpoint.backbone_config(config)
    window = config.data.window
    if window > cfg.max_position_embeddings:
      raise UserInputError(f"data.window={window}: longer than the model's max positions "
                           f"({cfg.max_position_embeddings})")
    sources, about = _split_sources(config, config.data.dir, config.data.splits.to_dict())
    corpora = {"in_domain": about}
    if config.data.ood_dir:
      ood, corpora[OOD] = _split_sources(config, config.data.ood_dir, None)
      sources[OOD] = ood["test"]
    data = cls(sources, tokenizer, checkpoint.separator_id(tokenizer, config), window,
               config.seed, config.data.read_threads, corpora)
    data._check_lengths(config)
    return data

  def _check_lengths(self, config):
    for split, stats in self.statistics.items():
      if stats["windows"] < 1:
        source = config.data.ood_dir if split == OOD else config.data.dir
        raise UserInputError(f"data.dir={source}: split {split!r} has {stats['tokens']} tokens, "
                             f"fewer than one window of data.window={self.window}")

  def windows(self, split: str, *, batch_size: int | None, shuffle: bool = True,
              num_epochs: int | None = None):
    """grain IterDataset of {"tokens": [B / processes, T]}: this process's rows of each global
    batch of `split` (every window, on every process, for batch_size=None)."""
    return pipeline.window_dataset(
        self.sources[split], self.tokenizer, length=self.window, separator=self.separator,
        batch_size=batch_size,
        seed=self.seed, shuffle=shuffle, num_epochs=num_epochs,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        read_threads=self.read_threads)

  def first_windows(self, split: str, count: int | None = None, *,
                    shuffle: bool = False) -> np.ndarray:
    """[N, T] int32: the first `count` windows of `split` (all of them for None), unshuffled
    or in the seeded shuffled order; the same on every process."""
    rows = []
    for window in self.windows(split, batch_size=None, shuffle=shuffle, num_epochs=1):
      rows.append(window["tokens"])
      if len(rows) == count:
        break
    return np.stack(rows).astype(np.int32)

  @functools.cached_property
  def statistics(self) -> dict[str, dict]:
    """{split: {"documents", "tokens", "windows"}} (tokenizes every split once)."""
    return {split: pipeline.split_statistics(source, self.tokenizer, length=self.window,
                                             separator=self.separator)
            for split, source in self.sources.items()}


def _split_sources(config, source: str,
                   fractions: dict[str, float] | None) -> tuple[dict[str, Any], dict]:
  """({split: random-access records}, a description for `dihal data`) of a folder / builtin
  corpus (built into the tfds cache) or of a prepared TFDS dataset (`tfds:NAME[:CONFIG]`);
  `fractions` None = one "test" split (the OOD set)."""
  if source.startswith(tfds_source.PREFIX):
    return tfds_source.tfds_sources(source, list(fractions or {"test": 1.0}), config.data)
  loaded = corpus.load_corpus(source, fractions, config.seed, encoding=config.data.encoding,
                              text_field=config.data.text_field)
  built = tfds_builder.build_text_dataset(loaded.splits, cache_root(config) / "tfds")
  about = {"source": source, "split_rule": loaded.split_rule, "files": loaded.files}
  return {split: built[split] for split in loaded.splits}, about


def prepare_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """`dihal data`: build what is missing, count documents / tokens / windows per split."""
  data = Data.from_config(config, workdir)
  report = data.statistics
  return {"splits": {k: v for k, v in report.items() if k != OOD},
          "ood": report.get(OOD), "window": data.window, "separator": data.separator,
          "corpora": data.corpora}


def summary(report: dict) -> str:
  """Markdown table of documents / tokens / windows per split."""
  from dihal_jax.reports import markdown_table
  rows = [[split, v["documents"], v["tokens"], v["windows"]] for split, v in report["splits"].items()]
  if report["ood"]:
    rows.append(["ood (test)", report["ood"]["documents"], report["ood"]["tokens"],
                 report["ood"]["windows"]])
  table = markdown_table(["split", "documents", "tokens", f"windows of {report['window']}"], rows)
  files = [[name, f["file"], f["encoding"], f["document_rule"], f["documents"]]
           for name, c in report["corpora"].items() for f in c["files"]]
  rules = "; ".join(f"{name}: {c['split_rule']}" for name, c in report["corpora"].items())
  parts = [table]
  if files:
    parts.append(markdown_table(["corpus", "file", "encoding", "document rule", "documents"],
                                files))
  return "\n\n".join(parts + [f"split rule: {rules}"])
