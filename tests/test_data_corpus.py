"""Corpus -> chapters -> splits -> tfds (array_record): splitting rules, the shipped
corpora's splits, the build round trip and cache, and bad input."""

from __future__ import annotations

import gzip
import pickle
from collections import Counter

import pytest

from dihal_jax.data import tfds_builder
from dihal_jax.data.corpus import (Chapter, assign_splits, corpus_splits, read_texts,
                                   split_chapters)
from dihal_jax.errors import UserInputError

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
AUSTEN_CHAPTERS = {"austen_emma": 55, "austen_mansfield_park": 48, "austen_northanger_abbey": 31,
                   "austen_persuasion": 24, "austen_pride_and_prejudice": 61,
                   "austen_sense_and_sensibility": 50}


def _ids(chapters):
  return [ch.doc_id for ch in chapters]


# --- chapter splitting ---------------------------------------------------------------

def test_roman_headings_and_preamble_dropped():
  text = ("EMMA\n\nBy Jane Austen\n\n\nCHAPTER I\n\nOne.\n\nCHAPTER II\n\nTwo.\nmore\n\n"
          "CHAPTER XIV\nThree.\n")
  chapters = split_chapters("book", text)
  assert chapters == [Chapter("book/000", "CHAPTER I\n\nOne."),
                      Chapter("book/001", "CHAPTER II\n\nTwo.\nmore"),
                      Chapter("book/002", "CHAPTER XIV\nThree.")]


def test_arabic_and_titled_headings():
  text = ("Title\n\nChapter 1\n\nA.\n\nChapter 2\nB.\n"
          "CHAPTER 3. Loomings.\nCall me Ishmael.\n  CHAPTER 4  \nD.\n")
  chapters = split_chapters("b", text)
  assert _ids(chapters) == ["b/000", "b/001", "b/002", "b/003"]
  assert chapters[2].text == "CHAPTER 3. Loomings.\nCall me Ishmael."
  assert chapters[3].text == "CHAPTER 4  \nD."


def test_volumes_restart_numbering_ids_are_positional():
  text = ("VOLUME I\n\nCHAPTER I\na\n\nCHAPTER II\nb\n\n\nVOLUME II\n\n\nCHAPTER I\nc\n"
          "CHAPTER II\nd\n")
  chapters = split_chapters("emma", text)
  assert _ids(chapters) == ["emma/000", "emma/001", "emma/002", "emma/003"]
  assert [ch.text for ch in chapters] == ["CHAPTER I\na", "CHAPTER II\nb", "CHAPTER I\nc",
                                          "CHAPTER II\nd"]


def test_prose_mentioning_chapters_is_not_a_heading():
  text = "Chapter 1\nx\nChapter 2 of the book was long.\nchapter 3\nCHAPTERS 4\n"
  assert _ids(split_chapters("b", text)) == ["b/000"]


def test_file_without_headings_is_one_document():
  assert split_chapters("notes", "\n  Just some text.\nMore.\n\n") == [
      Chapter("notes/000", "Just some text.\nMore.")]
  assert split_chapters("blank", " \n\n") == []


def test_read_texts_folder(tmp_path):
  (tmp_path / "b.txt").write_text("CHAPTER 1\nbee\n", encoding="utf-8")
  with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
    f.write("ay \u00e9\n")
  (tmp_path / "c.md").write_text("not read")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "d.txt").write_text("not read either")
  assert read_texts(str(tmp_path)) == [("a", "ay \u00e9\n"), ("b", "CHAPTER 1\nbee\n")]


# --- splits -----------------------------------------------------------------------------

def test_small_files_and_minimum_one_per_split():
  chapters = ([Chapter(f"a/{i:03d}", f"a{i}") for i in range(3)]
              + [Chapter(f"b/{i:03d}", f"b{i}") for i in range(2)]
              + [Chapter(f"c/{i:03d}", f"c{i}") for i in range(4)])
  splits = assign_splits(chapters, FRACTIONS, seed=0)
  stems = {name: Counter(ch.stem for ch in chs) for name, chs in splits.items()}
  assert stems["train"] == {"a": 1, "b": 2, "c": 2}
  assert stems["validation"] == stems["test"] == {"a": 1, "c": 1}
  for chs in splits.values():
    assert _ids(chs) == sorted(_ids(chs))


@pytest.fixture(scope="module")
def austen():
  return [ch for stem, text in read_texts("builtin:austen") for ch in split_chapters(stem, text)]


def test_austen_chapter_counts(austen):
  assert Counter(ch.stem for ch in austen) == AUSTEN_CHAPTERS
  assert all(ch.text.lower().startswith("chapter ") for ch in austen)
  assert not any("VOLUME" in ch.text for ch in austen)


def test_austen_splits(austen):
  splits = assign_splits(austen, FRACTIONS, seed=0)
  assert list(splits) == list(FRACTIONS)
  ids = {name: _ids(chs) for name, chs in splits.items()}
  assert sorted(sum(ids.values(), [])) == sorted(_ids(austen))  # union, no chapter twice
  for name, chs in splits.items():
    assert ids[name] == sorted(ids[name])
    per_book = Counter(ch.stem for ch in chs)
    assert set(per_book) == set(AUSTEN_CHAPTERS)
    for stem, n in AUSTEN_CHAPTERS.items():
      assert abs(per_book[stem] - FRACTIONS[name] * n) <= 1
  assert splits == corpus_splits("builtin:austen", FRACTIONS, seed=0)
  other = assign_splits(austen, FRACTIONS, seed=1)
  assert _ids(other["test"]) != ids["test"]
  assert sorted(_ids(other["train"]) + _ids(other["validation"]) + _ids(other["test"])) == \
      sorted(_ids(austen))


def test_moby_dick_one_test_split():
  splits = corpus_splits("builtin:moby_dick", None, seed=0)
  assert list(splits) == ["test"]
  chapters = splits["test"]
  assert len(chapters) == 135
  assert chapters[0].text.startswith("CHAPTER 1. Loomings.")
  assert "ETYMOLOGY" not in chapters[0].text


# --- tfds build -------------------------------------------------------------------------

def _write_corpus(folder, texts):
  folder.mkdir(exist_ok=True)
  for name, text in texts.items():
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")
  return str(folder)


TEXTS = {"one": "".join(f"CHAPTER {i}\nline {i} of one\n" for i in range(1, 7)),
         "two": "".join(f"Chapter {i}\ntwo says {i}\n" for i in range(1, 5)),
         "three": "no headings here\n"}


def _records(source):
  return [{k: v.decode() for k, v in source[i].items()} for i in range(len(source))]


def test_tfds_round_trip_cache_and_rebuild(tmp_path):
  corpus, data_dir = _write_corpus(tmp_path / "corpus", TEXTS), tmp_path / "tfds"
  splits = corpus_splits(corpus, FRACTIONS, seed=0)
  sources = tfds_builder.build_text_dataset(splits, data_dir)
  assert list(sources) == list(FRACTIONS)
  for name, chapters in splits.items():
    assert _records(sources[name]) == [{"doc_id": ch.doc_id, "text": ch.text} for ch in chapters]
  assert len(pickle.dumps(sources["train"])) < 10_000  # a path, not the chapters

  (built,) = (data_dir / "text_chapters").glob("*/1.0.0")
  stamp = (built / "dataset_info.json").stat().st_mtime_ns
  again = tfds_builder.build_text_dataset(corpus_splits(corpus, FRACTIONS, seed=0), data_dir)
  assert _records(again["test"]) == _records(sources["test"])
  assert list((data_dir / "text_chapters").glob("*/1.0.0")) == [built]
  assert (built / "dataset_info.json").stat().st_mtime_ns == stamp

  _write_corpus(tmp_path / "corpus", {"two": TEXTS["two"].replace("says 3", "said 3")})
  changed = corpus_splits(corpus, FRACTIONS, seed=0)
  assert tfds_builder.make_config(changed).name != tfds_builder.make_config(splits).name
  tfds_builder.build_text_dataset(changed, data_dir)
  assert len(list((data_dir / "text_chapters").glob("*/1.0.0"))) == 2


def test_tfds_empty_split_and_failed_build(tmp_path, monkeypatch):
  splits = {"train": [Chapter("x/000", "a"), Chapter("x/001", "b")], "test": []}
  sources = tfds_builder.build_text_dataset(splits, tmp_path)
  assert len(sources["train"]) == 2 and sources["test"] == []

  def broken(self, chapters):
    yield chapters[0].doc_id, {"doc_id": chapters[0].doc_id, "text": chapters[0].text}
    raise RuntimeError("interrupted")

  splits = {"train": [Chapter("y/000", "c"), Chapter("y/001", "d")]}
  monkeypatch.setattr(tfds_builder.TextChapters, "_generate_examples", broken)
  with pytest.raises(RuntimeError, match="interrupted"):
    tfds_builder.build_text_dataset(splits, tmp_path)
  config_dir = tmp_path / "text_chapters" / tfds_builder.make_config(splits).name
  assert list(config_dir.iterdir()) == []  # nothing half-written left to read
  monkeypatch.undo()
  assert _records(tfds_builder.build_text_dataset(splits, tmp_path)["train"])[1]["text"] == "d"


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("DIHAL_CACHE_DIR", str(tmp_path))
  assert tfds_builder.default_data_dir() == tmp_path / "tfds"


# --- bad input --------------------------------------------------------------------------

def _raises(match, fn, *args):
  with pytest.raises(UserInputError, match=match) as e:
    fn(*args)
  assert "\n" not in str(e.value)


def test_bad_folders(tmp_path):
  _raises(r"missing.*does not exist", read_texts, str(tmp_path / "missing"))
  (tmp_path / "file.txt").write_text("x")
  _raises(r"file\.txt: not a directory", read_texts, str(tmp_path / "file.txt"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "README.md").write_text("x")
  _raises(r"empty.*empty folder", read_texts, str(tmp_path / "empty"))
  _raises(r"builtin:shakespeare.*unknown builtin", read_texts, "builtin:shakespeare")


@pytest.mark.parametrize("files,expected", [
    ({"bad.txt": b"ok\n\xff\xfe\x00bad"}, r"bad\.txt: not valid UTF-8 at byte offset 3"),
    ({"blank.txt": b" \n"}, r"blank\.txt: the file has no text"),
    ({"broken.txt.gz": b"not gzip"}, r"broken\.txt\.gz: not a readable gzip file"),
    ({"dup.txt": b"a", "dup.txt.gz": gzip.compress(b"b")}, r"dup\.txt and dup\.txt\.gz"),
])
def test_bad_files(tmp_path, files, expected):
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  _raises(expected, corpus_splits, str(tmp_path), FRACTIONS, 0)


@pytest.mark.parametrize("fractions", [{"train": 0.8, "test": 0.1}, {"train": 1.2, "test": -0.2},
                                       {"train": 1.0, "test": 0.0}, {},
                                       {"train": 0.5, "all": 0.5}, {"train": "1"}])
def test_bad_fractions(fractions):
  _raises(r"data\.splits", assign_splits, [Chapter("a/000", "x")], fractions, 0)


def test_bad_data_dir(tmp_path):
  (tmp_path / "taken").write_text("x")
  _raises(r"taken.*cannot create", tfds_builder.build_text_dataset,
          {"train": [Chapter("a/000", "x")]}, tmp_path / "taken" / "tfds")
