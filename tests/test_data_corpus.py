"""Corpus -> chapters -> splits -> tfds (array_record): splitting rules, the shipped
corpora's splits, the build round trip and cache, and bad input."""

from __future__ import annotations

import gzip
import pickle
from collections import Counter

import pytest

from dihal_jax.data import tfds_builder
from dihal_jax.data.corpus import (Document, assign_splits, load_corpus, read_files,
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
  assert chapters == [Document("book/000", "CHAPTER I\n\nOne."),
                      Document("book/001", "CHAPTER II\n\nTwo.\nmore"),
                      Document("book/002", "CHAPTER XIV\nThree.")]


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
      Document("notes/000", "Just some text.\nMore.")]
  assert split_chapters("blank", " \n\n") == []


def test_read_files_folder(tmp_path):
  (tmp_path / "b.txt").write_text("CHAPTER 1\nbee\n", encoding="utf-8")
  with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
    f.write("ay \u00e9\n")
  (tmp_path / "c.md").write_text("not read")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "d.txt").write_text("not read either")
  assert [(f.stem, f.text) for f in read_files(str(tmp_path))] == [
      ("a", "ay \u00e9\n"), ("b", "CHAPTER 1\nbee\n")]


# --- splits -----------------------------------------------------------------------------

def test_small_files_and_minimum_one_per_split():
  chapters = ([Document(f"a/{i:03d}", f"a{i}") for i in range(3)]
              + [Document(f"b/{i:03d}", f"b{i}") for i in range(2)]
              + [Document(f"c/{i:03d}", f"c{i}") for i in range(4)])
  splits = assign_splits(chapters, FRACTIONS, seed=0)
  stems = {name: Counter(ch.stem for ch in chs) for name, chs in splits.items()}
  assert stems["train"] == {"a": 1, "b": 2, "c": 2}
  assert stems["validation"] == stems["test"] == {"a": 1, "c": 1}
  for chs in splits.values():
    assert _ids(chs) == sorted(_ids(chs))


@pytest.fixture(scope="module")
def austen():
  return [ch for f in read_files("builtin:austen") for ch in split_chapters(f.stem, f.text)]


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
  corpus = load_corpus("builtin:austen", FRACTIONS, seed=0)
  assert splits == corpus.splits and corpus.split_rule == "documents"
  assert {f["document_rule"] for f in corpus.files} == {"chapters"}
  other = assign_splits(austen, FRACTIONS, seed=1)
  assert _ids(other["test"]) != ids["test"]
  assert sorted(_ids(other["train"]) + _ids(other["validation"]) + _ids(other["test"])) == \
      sorted(_ids(austen))


def test_moby_dick_one_test_split():
  splits = load_corpus("builtin:moby_dick", None, seed=0).splits
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
  splits = load_corpus(corpus, FRACTIONS, seed=0).splits
  sources = tfds_builder.build_text_dataset(splits, data_dir)
  assert list(sources) == list(FRACTIONS)
  for name, chapters in splits.items():
    assert _records(sources[name]) == [{"doc_id": ch.doc_id, "text": ch.text} for ch in chapters]
  assert len(pickle.dumps(sources["train"])) < 10_000  # a path, not the chapters

  (built,) = (data_dir / "text_chapters").glob("*/1.0.0")
  stamp = (built / "dataset_info.json").stat().st_mtime_ns
  again = tfds_builder.build_text_dataset(load_corpus(corpus, FRACTIONS, 0).splits, data_dir)
  assert _records(again["test"]) == _records(sources["test"])
  assert list((data_dir / "text_chapters").glob("*/1.0.0")) == [built]
  assert (built / "dataset_info.json").stat().st_mtime_ns == stamp

  _write_corpus(tmp_path / "corpus", {"two": TEXTS["two"].replace("says 3", "said 3")})
  changed = load_corpus(corpus, FRACTIONS, seed=0).splits
  assert tfds_builder.make_config(changed).name != tfds_builder.make_config(splits).name
  tfds_builder.build_text_dataset(changed, data_dir)
  assert len(list((data_dir / "text_chapters").glob("*/1.0.0"))) == 2


def test_tfds_empty_split_and_failed_build(tmp_path, monkeypatch):
  splits = {"train": [Document("x/000", "a"), Document("x/001", "b")], "test": []}
  sources = tfds_builder.build_text_dataset(splits, tmp_path)
  assert len(sources["train"]) == 2 and sources["test"] == []

  def broken(self, chapters):
    yield chapters[0].doc_id, {"doc_id": chapters[0].doc_id, "text": chapters[0].text}
    raise RuntimeError("interrupted")

  splits = {"train": [Document("y/000", "c"), Document("y/001", "d")]}
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
  _raises(r"missing.*does not exist", read_files, str(tmp_path / "missing"))
  (tmp_path / "file.txt").write_text("x")
  _raises(r"file\.txt: not a directory", read_files, str(tmp_path / "file.txt"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "README.md").write_text("x")
  _raises(r"empty.*empty folder", read_files, str(tmp_path / "empty"))
  _raises(r"builtin:shakespeare.*unknown builtin", read_files, "builtin:shakespeare")


@pytest.mark.parametrize("files,expected", [
    ({"bad.txt": b"ok\n\xff\xfe\x00bad"},
     r"bad\.txt: not valid utf-8 at byte offset 3 \(set --config\.data\.encoding=auto"),
    ({"blank.txt": b" \n"}, r"blank\.txt: the file has no text"),
    ({"broken.txt.gz": b"not gzip"}, r"broken\.txt\.gz: not a readable gzip file"),
    ({"dup.txt": b"a", "dup.txt.gz": gzip.compress(b"b")}, r"dup\.txt and dup\.txt\.gz"),
])
def test_bad_files(tmp_path, files, expected):
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  _raises(expected, load_corpus, str(tmp_path), FRACTIONS, 0)


@pytest.mark.parametrize("fractions", [{"train": 0.8, "test": 0.1}, {"train": 1.2, "test": -0.2},
                                       {"train": 1.0, "test": 0.0}, {},
                                       {"train": 0.5, "all": 0.5}, {"train": "1"}])
def test_bad_fractions(fractions):
  _raises(r"data\.splits", assign_splits, [Document("a/000", "x")], fractions, 0)


def test_bad_data_dir(tmp_path):
  (tmp_path / "taken").write_text("x")
  _raises(r"taken.*cannot create", tfds_builder.build_text_dataset,
          {"train": [Document("a/000", "x")]}, tmp_path / "taken" / "tfds")


# --- documents from any layout -------------------------------------------------------------

def _article(i: int, words: int = 60) -> str:
  return " ".join(f"w{i}_{j}" for j in range(words)) + "."


def test_one_article_per_line_file_is_split_by_lines(tmp_path):
  (tmp_path / "news.txt").write_text("\n".join(_article(i) for i in range(30)) + "\n")
  corpus = load_corpus(str(tmp_path), FRACTIONS, seed=0)
  assert corpus.files == [{"file": "news.txt", "encoding": "utf-8", "document_rule": "lines",
                           "documents": 30}]
  assert corpus.split_rule == "documents"
  assert {k: len(v) for k, v in corpus.splits.items()} == {"train": 24, "validation": 3,
                                                            "test": 3}
  texts = [d.text for docs in corpus.splits.values() for d in docs]
  assert sorted(texts) == sorted(_article(i) for i in range(30))  # disjoint, nothing lost


def test_blank_line_blocks_and_short_lines(tmp_path):
  (tmp_path / "essay.txt").write_text("A first\nparagraph.\n\n \nA second one.\n\nThird.\n")
  (tmp_path / "wrapped.txt").write_text("short line one\nshort line two\nshort three\n")
  corpus = load_corpus(str(tmp_path), None, seed=0)
  assert [(f["file"], f["document_rule"], f["documents"]) for f in corpus.files] == [
      ("essay.txt", "blocks", 3), ("wrapped.txt", "file", 1)]
  assert [d.text for d in corpus.splits["test"]][:3] == ["A first\nparagraph.", "A second one.",
                                                         "Third."]


def test_many_small_files_are_one_document_each_and_split_across(tmp_path):
  for i in range(25):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"{_article(i)}\n\n{_article(100 + i)}\n")
  corpus = load_corpus(str(tmp_path), FRACTIONS, seed=0)
  assert {f["document_rule"] for f in corpus.files} == {"file"}
  sizes = {k: len(v) for k, v in corpus.splits.items()}
  assert sum(sizes.values()) == 25 and sizes["train"] == 20 and all(sizes.values())
  stems = [d.stem for docs in corpus.splits.values() for d in docs]
  assert sorted(stems) == [f"doc{i:02d}" for i in range(25)]


def test_jsonl_records(tmp_path):
  import json
  rows = [json.dumps({"id": i, "body": _article(i)}) for i in range(12)]
  with gzip.open(tmp_path / "dump.jsonl.gz", "wt") as f:
    f.write("\n".join(rows) + "\n\n")
  corpus = load_corpus(str(tmp_path), FRACTIONS, seed=0, text_field="body")
  assert corpus.files[0]["document_rule"] == "jsonl" and corpus.files[0]["documents"] == 12
  _raises(r"dump\.jsonl\.gz: line 1 has no string field 'text'", load_corpus, str(tmp_path),
          FRACTIONS, 0)
  (tmp_path / "dump.jsonl.gz").unlink()
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
  _raises(r"bad\.jsonl: line 2 is not JSON", load_corpus, str(tmp_path), FRACTIONS, 0)


def test_too_few_documents_fall_back_to_contiguous_spans(tmp_path):
  words = [f"word{i}" for i in range(1000)]
  (tmp_path / "one.txt").write_text("\n".join(" ".join(words[i:i + 10])
                                              for i in range(0, 1000, 10)))
  corpus = load_corpus(str(tmp_path), FRACTIONS, seed=0)
  assert corpus.files[0]["document_rule"] == "file"
  assert corpus.split_rule == "contiguous_spans"
  spans = {k: v[0].text.split() for k, v in corpus.splits.items()}
  assert spans["train"] + spans["validation"] + spans["test"] == words  # in order, no overlap
  # Cut by characters (words differ in length), moved to the next whitespace.
  assert [len(spans[k]) for k in FRACTIONS] == pytest.approx([800, 100, 100], abs=5)


def test_encodings(tmp_path):
  text = "The price was \u00a35 for Ren\u00e9e's caf\u00e9 bill, paid at noon on Tuesday.\n" * 8
  (tmp_path / "old.txt").write_bytes(text.encode("latin-1"))
  _raises(r"old\.txt: not valid utf-8 at byte offset 14 \(set --config\.data\.encoding=auto",
          read_files, str(tmp_path))
  assert read_files(str(tmp_path), "latin-1")[0].text == text
  auto = read_files(str(tmp_path), "auto")[0]
  assert auto.text == text and auto.encoding in ("latin_1", "iso8859_15", "cp1252", "cp1250")
  _raises(r"data\.encoding='klingon': unknown encoding", read_files, str(tmp_path), "klingon")


# --- a prepared TFDS dataset by name ---------------------------------------------------------

def _prepare_tiny_news(data_dir):
  """A TFDS dataset built here (array_record, no download): 50 train and 10 test articles."""
  import numpy as np
  import tensorflow_datasets as tfds

  class TinyNews(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"body": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 50), "test": self._generate_examples(50, 60)}

    def _generate_examples(self, start, stop):
      for i in range(start, stop):
        yield i, {"body": f"Article {i}. " + "The market opened on Monday. " * 20, "id": i}

  TinyNews(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))


@pytest.mark.slow
def test_dihal_data_reads_a_prepared_tfds_dataset_by_name(tmp_path):
  import json
  import subprocess
  import sys
  from conftest import REPO
  _prepare_tiny_news(tmp_path / "tfds")
  base = [sys.executable, "-m", "dihal_jax.cli", "data", "--config=configs/tiny_llama.py",
          "--config.data.dir=tfds:tiny_news", f"--config.data.tfds_dir={tmp_path / 'tfds'}",
          "--config.data.ood_dir=", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.data.tfds_splits.train=train[10%:]",
          "--config.data.tfds_splits.validation=train[:10%]"]
  # A new process: the builder class is unknown there, TFDS reads the prepared files.
  proc = subprocess.run(base + ["--config.data.text_field=body", f"--workdir={tmp_path / 'w'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "w" / "report.json").read_text())
  assert {k: v["documents"] for k, v in report["splits"].items()} == {
      "train": 45, "validation": 5, "test": 10}
  assert report["corpora"]["in_domain"]["split_rule"].startswith("tfds splits")
  proc = subprocess.run(base + [f"--workdir={tmp_path / 'w2'}"], cwd=REPO, capture_output=True,
                        text=True, timeout=600)  # data.text_field is still "text"
  assert proc.returncode == 2
  assert proc.stderr.splitlines()[-1].startswith(
      "dihal: error: data.text_field='text': tiny_news has features")
