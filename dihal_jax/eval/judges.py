"""The judges of `dihal eval`: every generated row measured the same way, with error bars.

- `gen_ppl`: perplexity under the backbone itself. Self-judged: the hybrid's tokens
  come from the same upper layers and LM head, and the backbone rewards its own
  habits (its own samples drift off-domain and still score low). Never read alone.
- `ngram_ppl`: an interpolated Kneser–Ney n-gram LM fit on the train split only
  (eval/ngram.py): in-domain and independent of the backbone.
- `mauve`: MAUVE against real text on all-MiniLM-L6-v2 features (eval/encoder.py,
  eval/mauve_score.py); `num_samples` / `mauve_reference` say how many it saw.
- diversity (distinct-n, Π(1 - rep_n), unigram entropy) and 4-gram memorization
  against the train split (eval/metrics.py).
- 95% bootstrap intervals over samples for gen_ppl, ngram_ppl and entropy
  (eval/bootstrap.py); with several sampling seeds, the per-seed perplexities too.

A row is scored from position `start` on: 1 for unconditional windows (the separator
is given), the prefix length for continuations (the prefix is context, not scored).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dihal_jax.backbone.model import Decoder
from dihal_jax.eval import bootstrap, metrics
from dihal_jax.eval.encoder import SentenceEncoder
from dihal_jax.eval.mauve_score import mauve
from dihal_jax.eval.ngram import KneserNey


@dataclasses.dataclass
class Judges:
  backbone: Decoder
  tokenizer: object
  ngram: KneserNey
  train_ngrams: np.ndarray  # unique train 4-grams (memorization)
  encoder: SentenceEncoder
  batch: int
  seed: int

  @classmethod
  def build(cls, backbone: Decoder, tokenizer, train_windows: np.ndarray, *, order: int,
            encoder: str, cache: Path, batch: int, seed: int) -> "Judges":
    """Loads the encoder first (a missing package fails before any fitting)."""
    sentence_encoder = SentenceEncoder(encoder, cache)
    ngram = KneserNey.fit(train_windows, backbone.cfg.vocab_size, order=order)
    train_ngrams = metrics.ngram_set([row[1:] for row in train_windows], 4)
    return cls(backbone, tokenizer, ngram, train_ngrams, sentence_encoder, batch, seed)

  def texts(self, tokens: np.ndarray, start: int = 1) -> list[str]:
    return [self.tokenizer.decode(row[start:].tolist()) for row in np.asarray(tokens)]

  def features(self, tokens: np.ndarray, start: int = 1) -> np.ndarray:
    """Sentence-encoder features of the scored part of each row."""
    return self.encoder(self.texts(tokens, start))

  def score(self, tokens: np.ndarray, *, start: int = 1, reference: np.ndarray | None = None,
            seeds: int = 1, features: np.ndarray | None = None) -> dict:
    """Every judge on tokens [N, T] from position `start`; MAUVE against `reference`
    features when given (`features`: the rows' own, when the caller already has them);
    `seeds` equal consecutive chunks of rows = the sampling seeds."""
    tokens = np.asarray(tokens)
    body = tokens[:, start:]
    backbone = metrics.gen_ppl(self.backbone, tokens, batch_size=self.batch, score_from=start)
    ng_nll, ng_count = self.ngram.nll(tokens, score_from=start)
    row = {
        "gen_ppl": backbone["gen_ppl"],
        "gen_ppl_ci": bootstrap.perplexity_ci(backbone["row_nll"], backbone["row_tokens"],
                                              self.seed),
        "ngram_ppl": float(np.exp(ng_nll.sum() / ng_count.sum())),
        "ngram_ppl_ci": bootstrap.perplexity_ci(ng_nll, ng_count, self.seed),
        "entropy": metrics.unigram_entropy(body),
        "entropy_ci": bootstrap.entropy_ci(body, self.seed),
        "distinct_1": metrics.distinct_n(body, 1), "distinct_2": metrics.distinct_n(body, 2),
        "distinct_3": metrics.distinct_n(body, 3), "diversity": metrics.diversity(body),
        "memorization_4gram": metrics.memorization(body, self.train_ngrams, 4),
        "num_samples": int(len(tokens)),
    }
    if reference is not None:
      row.update(self.mauve(tokens, reference, start, features))
    if seeds > 1:
      chunks = np.array_split(np.arange(len(tokens)), seeds)
      row["seed_gen_ppl"] = [float(np.exp(backbone["row_nll"][c].sum()
                                          / backbone["row_tokens"][c].sum())) for c in chunks]
      row["seed_ngram_ppl"] = [float(np.exp(ng_nll[c].sum() / ng_count[c].sum()))
                               for c in chunks]
    return row

  def mauve(self, tokens: np.ndarray, reference: np.ndarray, start: int = 1,
            features: np.ndarray | None = None) -> dict:
    """{"mauve", "mauve_reference"}: the scored part of tokens [N, T] (or its `features`)
    against `reference` features (a row's one set-dependent judge)."""
    features = self.features(tokens, start) if features is None else features
    return {"mauve": mauve(features, reference, seed=self.seed),
            "mauve_reference": int(len(reference))}
