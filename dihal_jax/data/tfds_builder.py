"""Document splits -> a TFDS dataset in array_record files (random access, no TensorFlow).

`TextChapters` is a `GeneratorBasedBuilder` whose config carries the chapters
themselves; the config's name is a hash of every split name, doc_id and text,
so the same data reuses its build and any change (text, split assignment)
builds a new one next to it. Records keep chapter order (`disable_shuffling`).

TFDS writes into `<data_dir>/text_chapters/<config>/incomplete.XXXXXX_1.0.0/`
and renames it to `1.0.0/` only when every file is written, so an interrupted
build leaves at most such a leftover folder (never read, rebuilt next time);
when two processes build the same config at once, the first rename wins and
the other reads its result. The returned sources come from a read-only builder
over the finished folder, so they pickle small (grain workers).

Usage:
  sources = build_text_dataset(load_corpus("builtin:austen", fractions, 0).splits, default_data_dir())
  sources["train"][0]  # {"doc_id": b"austen_emma/000", "text": b"CHAPTER I ..."}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds

from dihal_jax.data.corpus import Document
from dihal_jax.errors import UserInputError


@dataclasses.dataclass(eq=False)
class ChaptersConfig(tfds.core.BuilderConfig):
  """A config whose payload is split -> chapters (see `make_config`)."""

  splits: dict[str, list[Document]] = dataclasses.field(default_factory=dict, repr=False)


def _field(h: Any, s: str) -> None:
  data = s.encode("utf-8")
  h.update(len(data).to_bytes(8, "little") + data)


def make_config(splits: dict[str, list[Document]]) -> ChaptersConfig:
  """The config for `splits`; its name "h<16 hex>" is a sha256 of all their content."""
  h = hashlib.sha256()
  for name, chapters in splits.items():
    _field(h, name)
    h.update(len(chapters).to_bytes(8, "little"))
    for ch in chapters:
      _field(h, ch.doc_id)
      _field(h, ch.text)
  sizes = ", ".join(f"{name}: {len(chapters)}" for name, chapters in splits.items())
  return ChaptersConfig(name="h" + h.hexdigest()[:16], splits=splits,
                        description=f"text chapters ({sizes})")


class TextChapters(tfds.core.GeneratorBasedBuilder):
  """Records {"doc_id": text, "text": text}, one per chapter, per split."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # No checksums file to find; TFDS's own lookup imports `importlib_resources`,
    # which is not installed (TFDS requires it only for Python < 3.9).
    return None

  def _log_download_bytes(self) -> None:
    pass  # TFDS prints "Downloading and preparing dataset ..." to stdout here.

  def _log_download_done(self) -> None:
    pass  # ... and "Dataset ... downloaded and prepared" here.

  def _info(self) -> tfds.core.DatasetInfo:
    # dataset_info_from_configs() looks for metadata files next to the module: not here.
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"doc_id": tfds.features.Text(),
                                             "text": tfds.features.Text()}),
        disable_shuffling=True)  # record order = chapter order

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(chapters)
            for name, chapters in self.builder_config.splits.items()}

  def _generate_examples(self, chapters: list[Document]):
    for ch in chapters:
      yield ch.doc_id, {"doc_id": ch.doc_id, "text": ch.text}


def default_data_dir() -> Path:
  """$DIHAL_CACHE_DIR (or ~/.cache/dihal_jax) /tfds."""
  cache = os.environ.get("DIHAL_CACHE_DIR") or Path.home() / ".cache" / "dihal_jax"
  return Path(cache).expanduser() / "tfds"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """TFDS's absl logs (custom-config and missing-info warnings) at ERROR only, for the duration."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(level)


def _prepared(config: ChaptersConfig, data_dir: str) -> TextChapters:
  """The builder for `config`, its dataset built first if missing."""
  builder = TextChapters(config=config, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  except OSError:
    # Another process built the same config concurrently and renamed its folder first.
    builder = TextChapters(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      raise
  return builder


def build_text_dataset(splits: dict[str, list[Document]],
                       data_dir: str | os.PathLike) -> dict[str, Any]:
  """Builds (if missing) and returns {split: random-access data source}.

  Records are dicts {"doc_id": bytes, "text": bytes}, in the order of `splits`.
  An empty split gets an empty list (TFDS cannot store one).
  """
  stored = {name: chapters for name, chapters in splits.items() if chapters}
  sources = {}
  if stored:
    try:
      Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserInputError(f"data dir {data_dir}: cannot create it ({e.strerror}; expected a "
                           f"writable folder)") from None
    tfds.disable_progress_bar()
    with _quiet():
      path = _prepared(make_config(stored), os.fspath(data_dir)).data_path
      # Not TextChapters' own sources: those pickle with the chapters in its config.
      sources = tfds.builder_from_directory(path).as_data_source()
  return {name: sources.get(name, []) for name in splits}
