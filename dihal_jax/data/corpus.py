"""Text corpora -> documents -> train/validation/test splits of whole documents.

A corpus is a shipped one ("builtin:austen", "builtin:moby_dick") or a folder of
`.txt`, `.txt.gz`, `.jsonl` and `.jsonl.gz` files (sorted by name, not recursive).
Each file becomes documents by the first rule that applies (`document_rule`,
reported per file by `dihal data`):

  jsonl      a .jsonl file: one document per record's `data.text_field` string.
  file       the folder holds many files (>= MANY_FILES) and this one has no chapter
             headings: the whole file is one document (a folder of articles).
  chapters   chapter heading lines ("CHAPTER I", "Chapter 12", "CHAPTER 1. Loomings."),
             numbered by position (headings restart, as in Emma's three volumes);
             text before the first heading and from a volume heading to the next
             chapter is dropped.
  blocks     blank-line-separated blocks (two or more).
  lines      one document per non-empty line, when the lines are long (median >=
             LONG_LINE characters: one article per line).
  file       otherwise the whole file is one document.

Splits (`load_corpus`) take whole documents, drawn with a seeded RNG per file (or,
for single-document files, over the pooled files), so no passage of a test
document is seen in training. When the corpus has fewer documents than the splits
need, its text is cut instead into contiguous spans by the fractions, at
whitespace, never shuffled across a cut (`split_rule` = "contiguous_spans").

Text is decoded with `data.encoding` (default utf-8; "auto" detects each file's
encoding with charset-normalizer and reports it).

Usage:
  corpus = load_corpus("builtin:austen", {"train": 0.8, "validation": 0.1, "test": 0.1}, 0)
  corpus.splits["validation"][0].doc_id  # "austen_emma/012"
  corpus.files  # [{"file": "austen_emma", "document_rule": "chapters", ...}, ...]
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np

from dihal_jax import assets
from dihal_jax.errors import UserInputError

BUILTIN = {"austen": assets.AUSTEN, "moby_dick": (assets.MOBY_DICK,)}
BUILTIN_PREFIX = "builtin:"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
MANY_FILES = 20  # a folder with at least this many files: a file without chapters = a document
LONG_LINE = 200  # characters: lines at least this long (median) are documents of their own

# A chapter heading alone on its line: "CHAPTER IV", "Chapter 7", "CHAPTER 1. Loomings.".
_CHAPTER = r"(?:CHAPTER|Chapter)[ \t]+(?:[IVXLCDM]+|\d+)(?:\..*)?"
# A volume heading ends the chapter before it; the text up to the next chapter is dropped.
_VOLUME = r"(?:VOLUME|Volume)[ \t]+(?:[IVXLCDM]+|\d+)\.?"
_HEADING = re.compile(rf"^[ \t]*(?:(?P<chapter>{_CHAPTER})|{_VOLUME})[ \t\r]*$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")
_SPACE = re.compile(r"\s")


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: `doc_id` is "<file stem>/<NNN>" (position in the file, from 000)."""

  doc_id: str
  text: str

  @property
  def stem(self) -> str:
    return self.doc_id.rsplit("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """A file's decoded text and how it was read."""

  stem: str
  name: str
  text: str
  encoding: str


@dataclasses.dataclass
class Corpus:
  """Documents per split, and how each file and the split were made (for `dihal data`)."""

  splits: dict[str, list[Document]]
  files: list[dict]  # {"file", "encoding", "document_rule", "documents"}
  split_rule: str  # "documents" | "contiguous_spans" | "all_test"


def _decode(data: bytes, path: Path, encoding: str) -> tuple[str, str]:
  if encoding == "auto":
    from charset_normalizer import from_bytes
    best = from_bytes(data).best()
    if best is None:
      raise UserInputError(f"{path}: data.encoding=auto found no text encoding that decodes "
                           "this file (binary data?)")
    return str(best), best.encoding
  try:
    return data.decode("utf-8-sig" if encoding in ("utf-8", "utf8") else encoding), encoding
  except LookupError:
    raise UserInputError(f"data.encoding={encoding!r}: unknown encoding (expected e.g. utf-8, "
                         "latin-1, cp1252, or auto)") from None
  except UnicodeDecodeError as e:
    raise UserInputError(f"{path}: not valid {encoding} at byte offset {e.start} (set "
                         "--config.data.encoding=auto to detect it, or name it, e.g. latin-1)"
                         ) from None


def _read_file(path: Path, encoding: str) -> SourceFile:
  data = path.read_bytes()
  if path.name.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise UserInputError(f"{path}: not a readable gzip file ({e})") from None
  text, used = _decode(data, path, encoding)
  if not text.strip():
    raise UserInputError(f"{path}: the file has no text (expected a non-empty text file)")
  return SourceFile(_stem(path), path.name, text, used)


def _stem(path: Path) -> str:
  name = path.name.removesuffix(".gz")
  return name.removesuffix(".txt").removesuffix(".jsonl")


def read_files(source: str, encoding: str = "utf-8") -> list[SourceFile]:
  """The files of `source`: "builtin:<name>" or a folder (see the module docstring)."""
  if source.startswith(BUILTIN_PREFIX):
    name = source.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN:
      raise UserInputError(f"corpus {source!r}: unknown builtin corpus (expected one of "
                           f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN)} or a folder)")
    return [_read_file(assets.CORPORA_DIR / f"{stem}.txt.gz", "utf-8") for stem in BUILTIN[name]]
  folder = Path(source).expanduser()
  if not folder.exists():
    raise UserInputError(f"corpus folder {source}: does not exist (expected a folder of "
                         f"{'/'.join(SUFFIXES)} files or a builtin: name)")
  if not folder.is_dir():
    raise UserInputError(f"corpus {source}: not a directory (expected a folder of "
                         f"{'/'.join(SUFFIXES)} files)")
  files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
  if not files:
    raise UserInputError(f"corpus folder {source}: empty folder (expected "
                         f"{', '.join(SUFFIXES)} files)")
  by_stem: dict[str, Path] = {}
  for p in files:
    if (other := by_stem.setdefault(_stem(p), p)) is not p:
      raise UserInputError(f"corpus folder {source}: {other.name} and {p.name} have the same "
                           f"name (expected one file per document name)")
  return [_read_file(p, encoding) for p in by_stem.values()]


def split_chapters(stem: str, text: str) -> list[Document]:
  """The chapters of one file, each starting with its heading line.

  Text before the first chapter heading (title page, preface) is dropped, and so
  is the text from a volume heading to the next chapter; a file without chapter
  headings is one document. Whitespace around each chapter is stripped.
  """
  heads = list(_HEADING.finditer(text))
  starts = [m.start() for m in heads if m["chapter"]]
  if not starts:
    return [Document(f"{stem}/000", text.strip())] if text.strip() else []
  ends = [m.start() for m in heads[1:]] + [len(text)]
  bodies = [text[m.start():end].strip() for m, end in zip(heads, ends) if m["chapter"]]
  return [Document(f"{stem}/{i:03d}", body) for i, body in enumerate(bodies)]


def _numbered(stem: str, texts) -> list[Document]:
  return [Document(f"{stem}/{i:03d}", t) for i, t in enumerate(texts)]


def _jsonl_documents(file: SourceFile, text_field: str) -> list[Document]:
  texts = []
  for number, line in enumerate(file.text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserInputError(f"{file.name}: line {number} is not JSON ({e.msg})") from None
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
      raise UserInputError(f"{file.name}: line {number} has no string field {text_field!r} "
                           "(set data.text_field to the field holding the text)")
    if value.strip():
      texts.append(value.strip())
  return _numbered(file.stem, texts)


def documents(file: SourceFile, *, many_files: bool,
              text_field: str = "text") -> tuple[list[Document], str]:
  """(documents of one file, the rule that made them); rules in the module docstring."""
  if file.name.endswith((".jsonl", ".jsonl.gz")):
    return _jsonl_documents(file, text_field), "jsonl"
  has_chapters = any(m["chapter"] for m in _HEADING.finditer(file.text))
  if many_files and not has_chapters:
    return _numbered(file.stem, [file.text.strip()]), "file"
  if has_chapters:
    return split_chapters(file.stem, file.text), "chapters"
  blocks = [b.strip() for b in _BLANK_LINES.split(file.text) if b.strip()]
  if len(blocks) >= 2:
    return _numbered(file.stem, blocks), "blocks"
  lines = [line.strip() for line in file.text.splitlines() if line.strip()]
  if len(lines) >= 2 and np.median([len(line) for line in lines]) >= LONG_LINE:
    return _numbered(file.stem, lines), "lines"
  return _numbered(file.stem, [file.text.strip()]), "file"


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


POOLED = "<single-document files>"  # the split group of files that hold one document each


def assign_splits(docs: list[Document], fractions: dict[str, float],
                  seed: int) -> dict[str, list[Document]]:
  """Whole documents to splits by a seeded shuffle cut by `fractions`, per group.

  A group is one file's documents; files holding a single document are pooled into one
  group (a folder of articles). Each group is shuffled by an RNG seeded with (seed,
  crc32(group)) and cut in the dict's order; a group with at least len(fractions)
  documents puts one or more in every split, a smaller one goes entirely to the first
  split. Within a split, documents keep their order in `docs` (corpus order).
  """
  _check_fractions(fractions)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UserInputError(f"split seed {seed!r}: expected an integer >= 0")
  names, fracs = list(fractions), list(fractions.values())
  per_stem: dict[str, list[int]] = {}
  for i, doc in enumerate(docs):
    per_stem.setdefault(doc.stem, []).append(i)
  groups: dict[str, list[int]] = {}
  for stem, idx in per_stem.items():
    groups.setdefault(POOLED if len(idx) == 1 else stem, []).extend(idx)
  picked: dict[str, list[int]] = {name: [] for name in names}
  for group, idx in groups.items():
    if len(idx) < len(names):
      picked[names[0]] += idx
      continue
    rng = np.random.default_rng([int(seed), zlib.crc32(group.encode())])
    order = [idx[j] for j in rng.permutation(len(idx))]
    start = 0
    for name, count in zip(names, _counts(len(idx), fracs)):
      picked[name] += order[start:start + count]
      start += count
  return {name: [docs[i] for i in sorted(ids)] for name, ids in picked.items()}


def contiguous_spans(docs: list[Document], fractions: dict[str, float],
                     name: str) -> dict[str, list[Document]]:
  """The documents' text joined in corpus order and cut into one contiguous span per split,
  sized by `fractions`, each cut moved forward to the next whitespace."""
  _check_fractions(fractions)
  text = "\n\n".join(d.text for d in docs)
  cuts, total = [0], 0.0
  for f in list(fractions.values())[:-1]:
    total += f
    at = max(int(round(total * len(text))), cuts[-1])
    space = _SPACE.search(text, at)
    cuts.append(space.start() if space else len(text))
  cuts.append(len(text))
  return {split: [Document(f"{name}/{i:03d}", text[a:b].strip())]
          for i, (split, a, b) in enumerate(zip(fractions, cuts[:-1], cuts[1:]))}


def load_corpus(source: str, fractions: dict[str, float] | None, seed: int, *,
                encoding: str = "utf-8", text_field: str = "text") -> Corpus:
  """read_files -> documents -> splits; `fractions` None => every document in "test"."""
  files = read_files(source, encoding)
  many = len(files) >= MANY_FILES
  docs, report = [], []
  for f in files:
    made, rule = documents(f, many_files=many, text_field=text_field)
    docs += made
    report.append({"file": f.name, "encoding": f.encoding, "document_rule": rule,
                   "documents": len(made)})
  if fractions is None:
    return Corpus({"test": docs}, report, "all_test")
  splits = assign_splits(docs, fractions, seed)
  if docs and any(not part for part in splits.values()):
    name = files[0].stem if len(files) == 1 else "corpus"
    return Corpus(contiguous_spans(docs, fractions, name), report, "contiguous_spans")
  return Corpus(splits, report, "documents")
