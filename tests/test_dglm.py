"""DGLM pieces against independent references: transformers (soft-prompted loss and
generation), scikit-learn (latent classifier probabilities), closed forms (classifier
guidance gradient, perturbation), and hand-made corpora (passages and labels)."""

import gzip
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dihal_jax.backbone.checkpoint import byte_tokenizer
from dihal_jax.backbone.generate import generate
from dihal_jax.dglm import latent_diffusion, run, soft_prompt
from dihal_jax.dglm.attributes import LatentClassifier, TextJudge, parse_target, target_name
from dihal_jax.dglm.passages import load_passages, parse_books
from dihal_jax.errors import UserInputError

VALUES = {"book": ("austen", "moby_dick"), "speech": ("narration", "dialogue")}


def test_targets_parse_and_reject_unknown_names_and_values():
  assert parse_target("book=moby_dick", VALUES) == (("book", 1),)
  assert parse_target("book=austen+speech=dialogue", VALUES) == (("book", 0), ("speech", 1))
  assert target_name(((("book", 1), ("speech", 0))), VALUES) == "book=moby_dick+speech=narration"
  for bad in ("genre=x", "book=dickens", "book", "book=austen+book=moby_dick"):
    with pytest.raises(UserInputError):
      parse_target(bad, VALUES)
  with pytest.raises(UserInputError):
    parse_books("austen=builtin:austen")
  assert parse_books("a=x, b=y") == {"a": "x", "b": "y"}


def _book(folder, sentences, chapters=4):
  """A one-file corpus folder of `chapters` chapters; returns the file's text."""
  text = "".join(f"CHAPTER {i + 1}\n\n" + " ".join(sentences * 6) + "\n\n"
                 for i in range(chapters))
  folder.mkdir()
  (folder / "book.txt.gz").write_bytes(gzip.compress(text.encode()))
  return text


def test_passages_are_windows_of_their_book_with_labels_from_the_text(tmp_path):
  quoted = _book(tmp_path / "q", ['"Come here," said she.', "He went home."])
  plain = _book(tmp_path / "p", ["The whale swam on.", "Ahab looked at the sea."])
  tok = byte_tokenizer()
  sep = tok.bos_token_id
  out = load_passages({"q": str(tmp_path / "q"), "p": str(tmp_path / "p")},
                      tok, separator=sep, prefix=5, continuation=12,
                      fractions={"train": 0.5, "test": 0.5}, seed=0,
                      per_book={"train": 10, "test": 3})
  train = out["train"]
  assert train.tokens.shape == (20, 18) and np.all(train.tokens[:, 0] == sep)
  np.testing.assert_array_equal(train.labels["book"], [0] * 10 + [1] * 10)
  for row, book in zip(train.tokens, train.labels["book"]):
    pieces = np.split(row, np.flatnonzero(row == sep))  # documents are joined by separators
    for piece in pieces:
      text = tok.decode([t for t in piece if t != sep])
      assert text in (quoted, plain)[book]
  for cont, speech in zip(train.continuations, train.labels["speech"]):
    assert speech == ('"' in tok.decode(cont))
  assert train.labels["speech"][10:].sum() == 0  # the plain book has no quotation marks
  assert out["test"].tokens.shape == (6, 18)


def test_latent_classifier_matches_scikit_learn_probabilities():
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  for classes in (2, 3):
    y = rng.integers(0, classes, 120)
    ours = LatentClassifier.fit(x, y, classes, seed=0)
    ref = LogisticRegression(max_iter=2000, random_state=0).fit(x, y).predict_log_proba(x)
    for v in range(classes):
      np.testing.assert_allclose(ours.log_prob(jnp.asarray(x), v), ref[:, v], atol=1e-4)
    assert ours.accuracy(x, y) == pytest.approx(np.mean(ref.argmax(1) == y))


def test_text_judge_hits_need_every_attribute():
  texts = ["the whale and the sea"] * 10 + ['"my dear," said she'] * 10
  labels = {"book": np.array([1] * 10 + [0] * 10), "speech": np.array([0] * 10 + [1] * 10)}
  judge = TextJudge(texts, labels, seed=0)
  assert judge.hits(["the whale and the sea"], (("book", 1),)).tolist() == [True]
  assert judge.hits(["the whale and the sea"], (("book", 1), ("speech", 1))).tolist() == [False]


def test_on_target_latents_carry_the_target_and_never_a_prefix_own():
  rng = np.random.default_rng(0)
  labels = {"book": rng.integers(0, 2, 200), "speech": rng.integers(0, 2, 200)}
  latents = np.arange(200.0)[:, None] * np.ones((1, 3))  # row i's latent names i
  exclude = np.arange(0, 200, 3)
  target = (("book", 1), ("speech", 1))
  drawn = run.on_target_latents(SimpleNamespace(labels=labels), latents, target, exclude,
                                5000, seed=1)[:, 0].astype(int)
  eligible = {i for i in range(200) if labels["book"][i] == 1 and labels["speech"][i] == 1
              and i % 3}
  assert drawn.shape == (5000,) and set(drawn.tolist()) == eligible  # every one, only those
  none = {"book": np.zeros(10, int), "speech": np.zeros(10, int)}
  assert run.on_target_latents(SimpleNamespace(labels=none), latents[:10], target,
                               np.arange(0), 4, seed=1) is None


def test_classifier_guidance_gradient_closed_form():
  """d/dx log p(v | x/|x|) for a linear softmax classifier = J^T (w_v - sum_u p_u w_u),
  J = (I - u u^T)/|x| (float64 NumPy)."""
  rng = np.random.default_rng(1)
  w, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
  clf = LatentClassifier(w, b)
  x = rng.normal(size=(4, 1, 5)).astype(np.float32) * 3
  grad = np.asarray(latent_diffusion.guidance_gradient(jnp.asarray(x), [(clf, 2)]))
  for row, g in zip(x[:, 0].astype(np.float64), grad[:, 0]):
    n = np.linalg.norm(row)
    u = row / n
    logits = w @ u + b
    p = np.exp(logits - logits.max())
    p /= p.sum()
    expected = (np.eye(5) - np.outer(u, u)) / n @ (w[2] - p @ w)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)


def test_perturb_keeps_unit_norm_and_drops_rows():
  z = jax.random.normal(jax.random.key(0), (2000, 16))
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  out = np.asarray(soft_prompt.perturb(jax.random.key(1), z, noise=0.5, dropout=0.25))
  dropped = np.all(out == 0, axis=-1)
  assert 0.2 < dropped.mean() < 0.3
  np.testing.assert_allclose(np.linalg.norm(out[~dropped], axis=-1), 1.0, atol=1e-5)
  assert np.all(np.sum(out[~dropped] * np.asarray(z)[~dropped], -1) > 0.7)


@pytest.fixture(scope="module")
def soft(models):
  rng = np.random.default_rng(0)
  model, _ = models
  return rng.normal(size=(2, 3, model.cfg.hidden_size)).astype(np.float32) * 0.1


def test_soft_prompted_loss_matches_transformers(models, soft):
  model, hf = models
  tokens = np.random.default_rng(2).integers(3, model.cfg.vocab_size, (2, 9)).astype(np.int32)
  prefix = 3
  ours = float(soft_prompt.continuation_nll(model, jnp.asarray(soft), jnp.asarray(tokens), prefix))
  with torch.no_grad():
    ids = torch.tensor(tokens, dtype=torch.long)
    embeds = torch.cat([torch.tensor(soft), hf.get_input_embeddings()(ids)], dim=1)
    logits = hf(inputs_embeds=embeds).logits.double()
    k = soft.shape[1]
    pred = logits[:, k + prefix:-1]
    ref = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]),
                                            ids[:, 1 + prefix:].reshape(-1)).item()
  assert ours == pytest.approx(ref, rel=1e-5)


def test_soft_prompted_greedy_generation_matches_transformers(models, soft):
  model, hf = models
  prompt = np.array([[1, 40, 41, 42], [1, 50, 51, 52]], np.int32)
  ours = np.asarray(generate(model, jnp.asarray(prompt), max_new_tokens=6,
                             soft_prompt=jnp.asarray(soft)))
  with torch.no_grad():
    ids = torch.tensor(prompt, dtype=torch.long)
    embeds = torch.cat([torch.tensor(soft), hf.get_input_embeddings()(ids)], dim=1)
    out = []
    for _ in range(6):  # no cache: the whole sequence each step
      nxt = hf(inputs_embeds=embeds).logits[:, -1].argmax(-1)
      out.append(nxt)
      embeds = torch.cat([embeds, hf.get_input_embeddings()(nxt)[:, None]], dim=1)
  np.testing.assert_array_equal(ours, torch.stack(out, 1).numpy())


@pytest.mark.slow  # ~70 s on 2 shared cores
def test_latent_denoiser_learns_the_prefix_map_and_guidance_steers_it():
  """Continuation latent = the prefix latent's mirror image: after training, proposals sit
  near the mirror (cosine > 0.9); classifier guidance toward the other half-space of
  coordinate 0 moves most proposals there."""
  from flax import nnx

  from dihal_jax.bridge import diffusion
  from dihal_jax.bridge.train_step import OptimConfig, init_train_state, make_optimizer
  d = 8
  rng = np.random.default_rng(0)
  prefix = rng.normal(size=(4096, d)).astype(np.float32)
  prefix /= np.linalg.norm(prefix, axis=-1, keepdims=True)
  target = -prefix
  model = latent_diffusion.LatentDenoiser(d, width=64, blocks=2, rngs=nnx.Rngs(0))
  optim_cfg = OptimConfig(lr=3e-3, warmup_steps=20, total_steps=300, ema_decay=0.99)
  optimizer = make_optimizer(optim_cfg)
  cfg = diffusion.DiffusionConfig(schedule="cosine", prediction="x0", steps=20, sampler="ddim",
                                  guidance=1.0)
  state = init_train_state(model, optimizer)
  key = jax.random.key(0)
  for _ in range(300):
    idx = rng.integers(0, len(prefix), 128)
    state, _ = latent_diffusion.train_step(state, jnp.asarray(target[idx]),
                                           jnp.asarray(prefix[idx]), key, cfg=cfg,
                                           optimizer=optimizer, optim_cfg=optim_cfg,
                                           cond_dropout=0.1)
  test = prefix[:256]
  out = np.asarray(latent_diffusion.propose(state.model(ema=True), jnp.asarray(test),
                                            jax.random.key(1), cfg))
  assert np.mean(np.sum(out * -test, axis=-1)) > 0.9
  w = np.zeros((2, d), np.float32)
  w[1, 0] = 20.0  # class 1: coordinate 0 > 0
  clf = LatentClassifier(w, np.zeros(2, np.float32))
  positive = test[:, 0] > 0.3  # their mirror has coordinate 0 < -0.3: class 0
  guided = np.asarray(latent_diffusion.propose(state.model(ema=True), jnp.asarray(test),
                                               jax.random.key(1), cfg, steer=[(clf, 1)],
                                               scale=5.0))
  assert np.mean(out[positive, 0] > 0) < 0.1
  assert np.mean(guided[positive, 0] > 0) > 0.8
