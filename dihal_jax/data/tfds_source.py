"""Text from a prepared TFDS dataset by name: `data.dir=tfds:NAME[:CONFIG]`.

For users on pods whose corpora already live in TFDS (a GCS or local `data_dir`): the
dataset is read, never downloaded or built here, through TFDS's random-access data
source (it must be prepared in the array_record file format), and each record's text
feature (`data.text_field`) feeds the same grain window pipeline as a folder's
documents. Each project split (`data.splits`) reads the TFDS split named in
`data.tfds_splits` (a TFDS split string: "train", "validation", "train[:5%]", ...);
the OOD set reads `data.tfds_splits.test`. Records are documents.

Usage:
  sources, about = tfds_sources("tfds:my_news:2024", ["train", "test"], config.data)
"""

from __future__ import annotations

from typing import Any, Sequence

from dihal_jax.errors import UserInputError

PREFIX = "tfds:"


class TextRecords(Sequence):
  """A data source whose records are {"text": bytes} (the configured feature renamed)."""

  def __init__(self, source, field: str):
    self.source, self.field = source, field

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict[str, Any]:
    value = self.source[index][self.field]
    return {"text": value if isinstance(value, bytes) else str(value).encode("utf-8")}


def tfds_sources(spec: str, splits: list[str], data) -> tuple[dict[str, TextRecords], dict]:
  """({split: records} for the project's split names, a description for `dihal data`)."""
  import tensorflow_datasets as tfds

  name, _, builder_config = spec.removeprefix(PREFIX).partition(":")
  if not name:
    raise UserInputError(f"data.dir={spec!r}: expected tfds:NAME or tfds:NAME:CONFIG")
  full = f"{name}/{builder_config}" if builder_config else name
  data_dir = data.tfds_dir or None
  try:
    builder = tfds.builder(full, data_dir=data_dir)
  except Exception as e:  # TFDS raises several kinds for a name it cannot resolve
    raise UserInputError(f"data.dir={spec}: no TFDS dataset {full!r} in data.tfds_dir="
                         f"{data_dir or 'the TFDS default'} ({type(e).__name__})") from None
  if not builder.is_prepared():
    raise UserInputError(f"data.dir={spec}: {full} is not prepared in {builder.data_dir}; "
                         "prepare it first (tfds build ... --file_format=array_record)")
  features = builder.info.features
  if data.text_field not in features:
    raise UserInputError(f"data.text_field={data.text_field!r}: {full} has features "
                         f"{', '.join(features)}")
  wanted = {split: data.tfds_splits.get(split, split) for split in splits}
  try:
    read = {split: builder.as_data_source(split=tfds_split) for split, tfds_split in wanted.items()}
  except (ValueError, KeyError) as e:
    raise UserInputError(f"data.tfds_splits: {e} (the dataset has splits "
                         f"{', '.join(builder.info.splits)})") from None
  except NotImplementedError:
    raise UserInputError(f"data.dir={spec}: {full} is not stored as array_record (random "
                         "access); prepare it with --file_format=array_record") from None
  about = {"source": spec, "split_rule": "tfds splits " + ", ".join(
      f"{k}={v}" for k, v in wanted.items()), "files": []}
  return {split: TextRecords(source, data.text_field) for split, source in read.items()}, about
