"""Text corpora -> chapters -> train/validation/test splits of whole chapters.

A corpus is either a shipped one ("builtin:austen", "builtin:moby_dick") or a
folder of *.txt / *.txt.gz files (UTF-8). Each file is cut into chapters at its
heading lines ("CHAPTER I", "Chapter 12", "CHAPTER 1. Loomings."); chapters are
numbered by position, since headings restart (Emma's three volumes). Splits
take whole chapters, drawn per file with a seeded RNG, so no passage of a test
chapter is ever seen in training and every book appears in every split.

Usage:
  splits = corpus_splits("builtin:austen", {"train": 0.8, "validation": 0.1, "test": 0.1}, 0)
  splits["validation"][0].doc_id  # "austen_emma/012"
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np

from dihal_jax import assets
from dihal_jax.errors import UserInputError

BUILTIN = {"austen": assets.AUSTEN, "moby_dick": (assets.MOBY_DICK,)}
BUILTIN_PREFIX = "builtin:"

# A chapter heading alone on its line: "CHAPTER IV", "Chapter 7", "CHAPTER 1. Loomings.".
_CHAPTER = r"(?:CHAPTER|Chapter)[ \t]+(?:[IVXLCDM]+|\d+)(?:\..*)?"
# A volume heading ends the chapter before it; the text up to the next chapter is dropped.
_VOLUME = r"(?:VOLUME|Volume)[ \t]+(?:[IVXLCDM]+|\d+)\.?"
_HEADING = re.compile(rf"^[ \t]*(?:(?P<chapter>{_CHAPTER})|{_VOLUME})[ \t\r]*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Chapter:
  """One document: `doc_id` is "<file stem>/<NNN>" (position in the file, from 000)."""

  doc_id: str
  text: str

  @property
  def stem(self) -> str:
    return self.doc_id.rsplit("/", 1)[0]


def _decode(data: bytes, path: Path) -> str:
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserInputError(f"{path}: not valid UTF-8 at byte offset {e.start} "
                         f"(expected UTF-8 text)") from None


def _read_file(path: Path) -> str:
  data = path.read_bytes()
  if path.name.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise UserInputError(f"{path}: not a readable gzip file ({e})") from None
  text = _decode(data, path)
  if not text.strip():
    raise UserInputError(f"{path}: the file has no text (expected a non-empty text file)")
  return text


def _stem(path: Path) -> str:
  return path.name.removesuffix(".gz").removesuffix(".txt")


def read_texts(source: str) -> list[tuple[str, str]]:
  """(file stem, text) for `source`: "builtin:austen", "builtin:moby_dick", or a folder
  path whose *.txt and *.txt.gz files are read (sorted by name, not recursive)."""
  if source.startswith(BUILTIN_PREFIX):
    name = source.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN:
      raise UserInputError(f"corpus {source!r}: unknown builtin corpus (expected one of "
                           f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN)} or a folder)")
    return [(stem, _read_file(assets.CORPORA_DIR / f"{stem}.txt.gz")) for stem in BUILTIN[name]]
  folder = Path(source).expanduser()
  if not folder.exists():
    raise UserInputError(f"corpus folder {source}: does not exist (expected a folder of "
                         f".txt/.txt.gz files or a builtin: name)")
  if not folder.is_dir():
    raise UserInputError(f"corpus {source}: not a directory (expected a folder of "
                         f".txt/.txt.gz files)")
  files = sorted(p for p in folder.iterdir()
                 if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
  if not files:
    raise UserInputError(f"corpus folder {source}: empty folder (expected .txt or .txt.gz files)")
  by_stem: dict[str, Path] = {}
  for p in files:
    if (other := by_stem.setdefault(_stem(p), p)) is not p:
      raise UserInputError(f"corpus folder {source}: {other.name} and {p.name} have the same "
                           f"name (expected one file per document name)")
  return [(stem, _read_file(p)) for stem, p in by_stem.items()]


def split_chapters(stem: str, text: str) -> list[Chapter]:
  """The chapters of one file, each starting with its heading line.

  Text before the first chapter heading (title page, preface) is dropped, and so
  is the text from a volume heading to the next chapter; a file without chapter
  headings is one document. Whitespace around each chapter is stripped.
  """
  heads = list(_HEADING.finditer(text))
  starts = [m.start() for m in heads if m["chapter"]]
  if not starts:
    return [Chapter(f"{stem}/000", text.strip())] if text.strip() else []
  ends = [m.start() for m in heads[1:]] + [len(text)]
  bodies = [text[m.start():end].strip() for m, end in zip(heads, ends) if m["chapter"]]
  return [Chapter(f"{stem}/{i:03d}", body) for i, body in enumerate(bodies)]


def _check_fractions(fractions: dict[str, float]) -> None:
  if not fractions:
    raise UserInputError("data.splits: empty (expected e.g. {'train': 0.8, 'validation': 0.1, "
                         "'test': 0.1})")
  for name, f in fractions.items():
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name) or name == "all":
      raise UserInputError(f"data.splits: split name {name!r} (expected a word like 'train'; "
                           f"'all' is reserved)")
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and f > 0):
      raise UserInputError(f"data.splits.{name} = {f!r} (expected a fraction > 0)")
  total = sum(fractions.values())
  if abs(total - 1.0) > 1e-6:
    raise UserInputError(f"data.splits: fractions sum to {total:g} (expected 1)")


def _counts(n: int, fractions: list[float]) -> list[int]:
  """n items cut by `fractions` (largest remainder), each part >= 1 (needs n >= len)."""
  ideal = [f * n for f in fractions]
  counts = [max(1, math.floor(x)) for x in ideal]
  while sum(counts) > n:
    i = max((i for i, c in enumerate(counts) if c > 1), key=lambda i: counts[i] - ideal[i])
    counts[i] -= 1
  while sum(counts) < n:
    i = max(range(len(counts)), key=lambda i: ideal[i] - counts[i])
    counts[i] += 1
  return counts


def assign_splits(chapters: list[Chapter], fractions: dict[str, float],
                  seed: int) -> dict[str, list[Chapter]]:
  """Whole chapters to splits, per source file, by a seeded shuffle cut by `fractions`.

  Each file's chapters are shuffled by an RNG seeded with (seed, crc32(stem)) and
  cut in the dict's order; a file with at least len(fractions) chapters puts one
  or more in every split, a shorter one goes entirely to the first split. Within
  a split, chapters keep their order in `chapters` (corpus order).
  """
  _check_fractions(fractions)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UserInputError(f"split seed {seed!r}: expected an integer >= 0")
  names, fracs = list(fractions), list(fractions.values())
  by_stem: dict[str, list[int]] = {}
  for i, ch in enumerate(chapters):
    by_stem.setdefault(ch.stem, []).append(i)
  picked: dict[str, list[int]] = {name: [] for name in names}
  for stem, idx in by_stem.items():
    if len(idx) < len(names):
      picked[names[0]] += idx
      continue
    rng = np.random.default_rng([int(seed), zlib.crc32(stem.encode())])
    order = [idx[j] for j in rng.permutation(len(idx))]
    start = 0
    for name, count in zip(names, _counts(len(idx), fracs)):
      picked[name] += order[start:start + count]
      start += count
  return {name: [chapters[i] for i in sorted(ids)] for name, ids in picked.items()}


def corpus_splits(source: str, fractions: dict[str, float] | None,
                  seed: int) -> dict[str, list[Chapter]]:
  """read_texts -> split_chapters -> assign_splits; `fractions` None => all in "test"."""
  chapters = [ch for stem, text in read_texts(source) for ch in split_chapters(stem, text)]
  if fractions is None:
    return {"test": chapters}
  return assign_splits(chapters, fractions, seed)
