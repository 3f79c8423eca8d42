"""Labelled passages for DGLM: (prefix, continuation) windows of several books, each with
the labels the text gives for free.

Each book is a corpus source (`name=source`, e.g. `moby_dick=builtin:moby_dick`) split into
train / validation / test by documents (data/corpus.py, the data section's fractions and
seed). A split's documents are tokenized and joined into one stream cut into windows of
1 + prefix + continuation tokens: the separator, the prefix the decoder is given, and the
continuation the latent describes. Labels of a window:
- `book`: the source's name;
- `speech`: "dialogue" when the continuation's text holds a double quotation mark,
  "narration" otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dihal_jax.data.corpus import load_corpus
from dihal_jax.errors import UserInputError

QUOTES = ('"', "\u201c", "\u201d")
SPEECH = ("narration", "dialogue")


def parse_books(spec: str) -> dict[str, str]:
  """"a=src,b=src2" -> {"a": "src", "b": "src2"}; at least two books."""
  books = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, source = part.partition("=")
    if not sep or not name.strip() or not source.strip():
      raise UserInputError(f"--config.dglm.books={spec!r}: expected name=source[,name=source]")
    books[name.strip()] = source.strip()
  if len(books) < 2:
    raise UserInputError(f"--config.dglm.books={spec!r}: name at least two books (the book "
                         "attribute needs two values)")
  return books


@dataclasses.dataclass
class Passages:
  """Windows [N, 1 + P + C] int32 and their labels ({attribute: [N] int index into values})."""

  tokens: np.ndarray
  labels: dict[str, np.ndarray]
  values: dict[str, tuple[str, ...]]
  prefix: int  # P (the separator is not counted)

  @property
  def continuations(self) -> np.ndarray:
    return self.tokens[:, 1 + self.prefix:]

  @property
  def prefixes(self) -> np.ndarray:
    """[N, 1 + P]: the separator and the prefix."""
    return self.tokens[:, :1 + self.prefix]

  def take(self, index) -> "Passages":
    return Passages(self.tokens[index], {a: v[index] for a, v in self.labels.items()},
                    self.values, self.prefix)


def _windows(texts: list[str], tokenizer, separator: int, length: int) -> np.ndarray:
  """Non-overlapping [M, length] windows of the joined token stream, separator prepended."""
  stream = []
  for text in texts:
    stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    stream.append(separator)
  body = length - 1
  count = len(stream) // body
  rows = np.asarray(stream[:count * body], np.int32).reshape(count, body)
  return np.concatenate([np.full((count, 1), separator, np.int32), rows], axis=1)


def load_passages(books: dict[str, str], tokenizer, *, separator: int, prefix: int,
                  continuation: int, fractions: dict[str, float], seed: int,
                  per_book: dict[str, int]) -> dict[str, Passages]:
  """{split: Passages} with at most per_book[split] windows of each book (a seeded sample,
  the same count for every book when all have enough, so the book attribute is balanced)."""
  rng = np.random.default_rng(seed)
  names = tuple(books)
  out = {}
  per_split = {split: [] for split in per_book}
  for name, source in books.items():
    corpus = load_corpus(source, fractions, seed)
    for split in per_book:
      rows = _windows([d.text for d in corpus.splits.get(split, [])], tokenizer, separator,
                      1 + prefix + continuation)
      if len(rows) == 0:
        raise UserInputError(f"--config.dglm.books: {name} ({source}) has no {split} windows "
                             f"of {1 + prefix + continuation} tokens")
      per_split[split].append(rows)
  for split, parts in per_split.items():
    count = min(per_book[split], *(len(p) for p in parts))
    tokens, book = [], []
    for index, rows in enumerate(parts):
      tokens.append(rows[np.sort(rng.choice(len(rows), count, replace=False))])
      book.append(np.full(count, index, np.int32))
    tokens = np.concatenate(tokens)
    texts = tokenizer.batch_decode(tokens[:, 1 + prefix:])
    speech = np.array([any(q in t for q in QUOTES) for t in texts], np.int32)
    out[split] = Passages(tokens, {"book": np.concatenate(book), "speech": speech},
                          {"book": names, "speech": SPEECH}, prefix)
  return out
