"""Two synthetic probing tasks with known structure, cut from real text (no downloads).

Both produce `Items`: clean and corrupted token rows that differ at exactly one position
(the cue), the position P of the answer, and the answer under each input. Every row is
[separator, context ..., masks]: positions P.. hold the mask id, so the AR model (causal:
the masks are invisible to it) and the masked diffusion model (it sees masks where the
future is unknown, as when it generates) get the same tokens.

- local, "bigram": the answer is fixed by the token just before it. Heads a whose next
  token b follows them in >= `min_share` of their >= `min_count` occurrences in the
  training stream (name pieces such as " Wick" -> "ham"); an item is P - 1 tokens of
  test text ending in a, answer b. Corrupted: a replaced by another head a', answer b'.
  Cue distance 1.
- global, "copy": the answer is fixed by a token far back. A span S of `span` test tokens,
  `filler` tokens of other test text, then S without its last token: answer S[-1] (copy
  from `span + filler` positions back). S[-1] is a word token found nowhere else in the
  row. Corrupted: the first S[-1] replaced by another word token c, answer c; the local
  context of the answer is identical in both rows, so only the distant cue can decide.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Items:
  """clean, corrupt [n, T] int32; answer position P; answers [n] under each input; cue P'."""

  clean: np.ndarray
  corrupt: np.ndarray
  position: int
  answer: np.ndarray
  corrupt_answer: np.ndarray
  cue: int

  def __len__(self):
    return len(self.answer)


def determined_bigrams(stream: np.ndarray, *, min_count: int, min_share: float,
                       exclude: set[int]) -> dict[int, int]:
  """{a: b} for tokens a (count >= min_count) followed by b in >= min_share of cases."""
  stream = np.asarray(stream, np.int64)
  pairs = np.stack([stream[:-1], stream[1:]], axis=1)
  keep = ~np.isin(pairs, list(exclude)).any(axis=1) if exclude else np.ones(len(pairs), bool)
  pairs = pairs[keep]
  heads, head_counts = np.unique(pairs[:, 0], return_counts=True)
  unique_pairs, pair_counts = np.unique(pairs, axis=0, return_counts=True)
  count_of = dict(zip(heads.tolist(), head_counts.tolist()))
  out = {}
  for (a, b), n in zip(unique_pairs.tolist(), pair_counts.tolist()):
    if count_of[a] >= min_count and n >= min_share * count_of[a]:
      out[a] = b
  return out


def _row(context: list[int], separator: int, mask_id: int, masks: int) -> np.ndarray:
  return np.array([separator] + context + [mask_id] * masks, np.int32)


def bigram_items(train_stream: np.ndarray, test_stream: np.ndarray, *, num: int, position: int,
                 separator: int, mask_id: int, masks: int, seed: int, min_count: int = 20,
                 min_share: float = 0.9) -> Items:
  """The local task (module docstring), `num` items with the answer at `position`."""
  table = determined_bigrams(train_stream, min_count=min_count, min_share=min_share,
                             exclude={separator, mask_id})
  if len(set(table.values())) < 2:
    raise ValueError("bigram task: fewer than two determined bigrams with distinct answers")
  rng = np.random.default_rng(seed)
  test = np.asarray(test_stream, np.int64)
  starts = [i for i in range(position - 2, len(test) - 1)
            if table.get(int(test[i])) == int(test[i + 1])
            and separator not in test[i - position + 2:i + 1]]
  rng.shuffle(starts)
  # No head takes more than 1/8 of the items, unless there are fewer than 8 heads to draw from.
  cap = max(1, num // 8, -(-num // max(1, len({int(test[i]) for i in starts}))))
  heads = sorted(table)
  per_head: dict[int, int] = {}
  rows = []
  for i in starts:
    a = int(test[i])
    if per_head.get(a, 0) >= cap:
      continue
    others = [h for h in heads if table[h] != table[a]]
    a2 = int(others[rng.integers(len(others))])
    context = test[i - position + 2:i + 1].tolist()  # P - 1 tokens ending in a
    clean = _row(context, separator, mask_id, masks)
    corrupt = clean.copy()
    corrupt[position - 1] = a2
    rows.append((clean, corrupt, table[a], table[a2]))
    per_head[a] = per_head.get(a, 0) + 1
    if len(rows) == num:
      break
  return _items(rows, num, position, position - 1, "bigram")


def copy_items(test_stream: np.ndarray, word_tokens: np.ndarray, *, num: int, span: int,
               filler: int, separator: int, mask_id: int, masks: int, seed: int) -> Items:
  """The global task (module docstring): answer at P = 2 * span + filler."""
  rng = np.random.default_rng(seed)
  test = np.asarray(test_stream, np.int64)
  words = np.asarray(word_tokens, np.int64)
  word_set = set(words.tolist())
  position = 2 * span + filler
  rows = []
  for _ in range(num * 50):
    s0, f0 = rng.integers(0, len(test) - span), rng.integers(0, len(test) - filler)
    s, f = test[s0:s0 + span].tolist(), test[f0:f0 + filler].tolist()
    answer = s[-1]
    if (answer not in word_set or answer in s[:-1] or answer in f
        or abs(int(s0) - int(f0)) < span + filler or separator in s + f):
      continue
    c = int(words[rng.integers(len(words))])
    if c in s or c in f:
      continue
    clean = _row(s + f + s[:-1], separator, mask_id, masks)
    corrupt = clean.copy()
    corrupt[span] = c
    rows.append((clean, corrupt, answer, c))
    if len(rows) == num:
      break
  return _items(rows, num, position, span, "copy")


def _items(rows, num, position, cue, name) -> Items:
  if len(rows) < num:
    raise ValueError(f"{name} task: found {len(rows)} items, {num} asked")
  clean, corrupt, answer, corrupt_answer = zip(*rows)
  return Items(np.stack(clean), np.stack(corrupt), position, np.array(answer, np.int32),
               np.array(corrupt_answer, np.int32), cue)
