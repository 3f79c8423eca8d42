"""Token windows with grain: chapters -> tokens -> fixed windows -> (sharded) batches.

A window is the document separator followed by the next `length - 1` tokens
of the concatenated token stream of a split (chapters joined by the
separator), so every window starts with the same token (docs/design.md,
"Position 0"). The pipeline:

  MapDataset.source(tfds data source) .shuffle(seed) .repeat(epochs)
  .map(Tokenize) -> IterDataset
  -> ConcatThenSplitIterDataset(length - 1) -> drop the padded tail
  -> prepend separator -> batch(global batch) -> this process's rows

Multi-host: every process tokenizes the same stream (cheap next to a forward
pass) and keeps rows [i * B/P, (i + 1) * B/P) of each global batch, so the
global batch, and every result computed from it, does not depend on the
number of processes (the rows a process holds are the ones
`jax.make_array_from_process_local_data` places on its devices).

Same seed -> same batches; the iterator's `get_state()`/`set_state()` (and
`grain.checkpoint.CheckpointSave/Restore` inside an Orbax manager) resume
with exactly the next batch.

Usage:
  it = iter(window_dataset(source, tokenizer, length=64, separator=0, batch_size=16, seed=0))
  batch = next(it)  # {"tokens": int32 [16, 64]}
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from dihal_jax.errors import UserInputError


class Tokenize(grain.transforms.Map):
  """Record {"text": bytes} -> {"tokens": int32 [n + 1]}: the chapter's ids, then the separator."""

  def __init__(self, tokenizer, separator: int):
    self.tokenizer = tokenizer
    self.separator = separator

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    text = record["text"]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return {"tokens": np.asarray(ids + [self.separator], np.int32)}


def _prepend(separator: int):
  def prepend(example):
    return {"tokens": np.concatenate([np.asarray([separator], np.int32), example["tokens"]])}
  return prepend


def _complete(example) -> bool:
  """ConcatThenSplit pads the last window of a finite stream (segment id 0): drop it."""
  return bool(np.all(example["tokens_segment_ids"] > 0))


def window_dataset(source: Sequence, tokenizer, *, length: int, separator: int,
                   batch_size: int | None, seed: int, shuffle: bool = True,
                   num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                   read_threads: int = 2) -> grain.IterDataset:
  """The grain pipeline of windows for one split.

  Args:
    source: random-access records {"doc_id", "text"} (a tfds data source or a list).
    tokenizer: the backbone's HF tokenizer.
    length: window length T, separator included.
    separator: token id every window starts with (and chapters are joined by).
    batch_size: global windows per batch (None: unbatched windows, all of them).
    seed: shuffle seed (chapter order; reshuffled each epoch).
    shuffle: False keeps corpus order (evaluation).
    num_epochs: None repeats forever.
    shard_index, shard_count: this process keeps rows shard_index of shard_count equal
      parts of each global batch (multi-host).
  Returns:
    IterDataset of {"tokens": int32 [batch_size / shard_count, T]} (or [T] unbatched).
  """
  if length < 2:
    raise UserInputError(f"data.window={length}: expected >= 2")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(Tokenize(tokenizer, separator))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=16))
  it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": length - 1})
  it = it.filter(_complete).map(_prepend(separator))
  if batch_size is None:
    return it
  rows = process_rows(shard_index, shard_count, batch_size)
  return it.batch(batch_size, drop_remainder=True).map(
      lambda batch: {k: v[rows] for k, v in batch.items()})


def process_rows(shard_index: int, shard_count: int, batch_size: int) -> slice:
  """The rows [i * B/P, (i + 1) * B/P) of a global batch of B that process i of P holds."""
  if batch_size % shard_count:
    raise UserInputError(f"batch size {batch_size} is not divisible by the {shard_count} "
                         "processes")
  size = batch_size // shard_count
  return slice(shard_index * size, (shard_index + 1) * size)


def split_statistics(source: Sequence, tokenizer, *, length: int, separator: int) -> dict:
  """Documents, tokens (separators included) and full windows of one split."""
  tokenize = Tokenize(tokenizer, separator)
  tokens = sum(len(tokenize.map(source[i])["tokens"]) for i in range(len(source)))
  return {"documents": len(source), "tokens": int(tokens), "windows": int(tokens // (length - 1))}
