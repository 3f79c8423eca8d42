"""Attribute targets, the linear classifiers on the latent that steer sampling, and the
independent judge that scores the text.

- A target is `attribute=value`, or several joined by `+` (composed control), e.g.
  `book=moby_dick+speech=dialogue`.
- `LatentClassifier`: multinomial logistic regression (scikit-learn) on the sentence
  latents of the train split; its log-probability is differentiable in JAX, so its
  gradient steers the latent diffusion sampler (classifier guidance).
- `TextJudge`: TF-IDF word (and quotation-mark) 1-2-grams + logistic regression fit on the
  train split's *texts*: it never sees a latent or a generator, so generated text is
  scored by a model the generator could not have fitted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dihal_jax.errors import UserInputError

Target = tuple[tuple[str, int], ...]  # ((attribute, value index), ...)


def parse_target(spec: str, values: dict[str, tuple[str, ...]]) -> Target:
  """"book=moby_dick+speech=dialogue" -> (("book", 1), ("speech", 1)); unknown names fail."""
  out = []
  for part in spec.split("+"):
    name, sep, value = (s.strip() for s in part.partition("="))
    if not sep or name not in values:
      raise UserInputError(f"attribute {part.strip()!r}: expected NAME=VALUE with NAME one of "
                           f"{', '.join(values)}")
    if value not in values[name]:
      raise UserInputError(f"attribute {name}={value}: {name} is one of "
                           f"{', '.join(values[name])}")
    if name in dict(out):
      raise UserInputError(f"attribute {spec!r}: {name} given twice")
    out.append((name, values[name].index(value)))
  return tuple(out)


def target_name(target: Target, values: dict[str, tuple[str, ...]]) -> str:
  return "+".join(f"{a}={values[a][v]}" for a, v in target)


@dataclasses.dataclass(frozen=True)
class LatentClassifier:
  """logits = latents @ weight.T + bias over an attribute's values (unit-norm latents)."""

  weight: np.ndarray  # [V, d]
  bias: np.ndarray  # [V]

  @classmethod
  def fit(cls, latents: np.ndarray, labels: np.ndarray, num_values: int,
          seed: int) -> "LatentClassifier":
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(max_iter=2000, random_state=seed).fit(latents, labels)
    if num_values == 2:  # scikit-learn keeps one row for two classes: logit of class 1
      weight = np.stack([np.zeros_like(model.coef_[0]), model.coef_[0]])
      bias = np.array([0.0, model.intercept_[0]])
    else:
      weight, bias = model.coef_, model.intercept_
    return cls(weight.astype(np.float32), bias.astype(np.float32))

  def log_prob(self, latents: jax.Array, value) -> jax.Array:
    """log p(value | latent) [B] for latents [B, d]."""
    logits = latents @ jnp.asarray(self.weight).T + jnp.asarray(self.bias)
    return jax.nn.log_softmax(logits, axis=-1)[:, value]

  def predict(self, latents: np.ndarray) -> np.ndarray:
    return np.argmax(latents @ self.weight.T + self.bias, axis=-1)

  def accuracy(self, latents: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(self.predict(latents) == labels))


# Words of two or more characters (scikit-learn's default) and the double quotation mark,
# which the default drops and which marks dialogue.
TOKENS = r"(?u)\b\w\w+\b|[\"\u201c\u201d]"


class TextJudge:
  """One TF-IDF + logistic-regression classifier per attribute, on texts; classes weighted
  to balance (dialogue is the rarer speech label), so a judge cannot score by the majority."""

  def __init__(self, texts: list[str], labels: dict[str, np.ndarray], seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    self.models = {
        name: make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                                            token_pattern=TOKENS),
                            LogisticRegression(max_iter=2000, class_weight="balanced",
                                               random_state=seed)
                            ).fit(texts, y)
        for name, y in labels.items()}

  def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
    return {name: model.predict(texts) for name, model in self.models.items()}

  def hits(self, texts: list[str], target: Target) -> np.ndarray:
    """[N] bool: the judge gives every attribute of `target` its value."""
    predicted = self.predict(texts)
    return np.all([predicted[name] == value for name, value in target], axis=0)
