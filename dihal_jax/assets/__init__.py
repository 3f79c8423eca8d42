"""Files shipped inside the package: the public-domain corpora (see corpora/README.md).

Austen's six novels are the in-domain corpus, Moby Dick the out-of-domain one.
They are gzip-compressed copies of the project's shared corpora, so a fresh
clone needs nothing outside the repository.
"""

from __future__ import annotations

import gzip
from pathlib import Path

CORPORA_DIR = Path(__file__).parent / "corpora"
AUSTEN = ("austen_emma", "austen_mansfield_park", "austen_northanger_abbey",
          "austen_persuasion", "austen_pride_and_prejudice", "austen_sense_and_sensibility")
MOBY_DICK = "melville_moby_dick"


def read_corpus(name: str) -> str:
  """The text of one shipped novel, e.g. read_corpus("austen_emma")."""
  with gzip.open(CORPORA_DIR / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
    return f.read()
