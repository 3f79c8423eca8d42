"""analysis/: CKA vs the Gram-matrix definition and known cases, attention statistics on
hand-built maps, the instrumented forward and activation patching vs `transformers` (its
eager attention probabilities, forward hooks that patch a decoder layer or one head), the
task generators' structure and determinism."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dihal_jax.analysis import attention_stats, patching, similarity, tasks
from dihal_jax.analysis import trace as tracing


def _cka_gram(x, y):
  """CKA from n x n Gram matrices and the centering matrix (Kornblith et al., eq. 3)."""
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  hsic = lambda k, l: np.trace(k @ h @ l @ h)
  k, l = x @ x.T, y @ y.T
  return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def test_cka_matches_the_gram_definition_and_known_cases():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 12))
  y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(200, 7))
  np.testing.assert_allclose(similarity.linear_cka(x, y), _cka_gram(x, y), rtol=1e-10)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  assert similarity.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
  assert similarity.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-10)
  independent = similarity.linear_cka(rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8)))
  assert independent < 0.01
  with pytest.raises(ValueError):
    similarity.linear_cka(x, y[:10])
  normed = similarity.rms_normalized(x * rng.uniform(0.1, 100, size=(200, 1)))
  np.testing.assert_allclose(np.sqrt(np.mean(normed ** 2, axis=1)), 1.0, rtol=1e-12)
  np.testing.assert_allclose(normed, similarity.rms_normalized(x), rtol=1e-10)


def test_attention_statistics_on_hand_built_maps():
  t = 6
  previous = np.zeros((t, t))
  previous[0, 0] = 1.0
  previous[np.arange(1, t), np.arange(t - 1)] = 1.0
  uniform = np.tril(np.ones((t, t)))
  uniform /= uniform.sum(axis=1, keepdims=True)
  future = np.zeros((t, t))
  future[np.arange(t), np.minimum(np.arange(t) + 2, t - 1)] = 1.0
  probs = np.stack([previous, uniform, future])[None]  # [1, 3 heads, T, T]
  queries = np.arange(t)[None] > 0
  stats = attention_stats.head_statistics(probs, queries)
  i = np.arange(1, t)
  np.testing.assert_allclose(stats["mean_distance"], [1.0, np.mean(i / 2), np.mean(
      np.minimum(i + 2, t - 1) - i)])
  np.testing.assert_allclose(stats["entropy"], [0.0, np.mean(np.log(i + 1)), 0.0], atol=1e-12)
  np.testing.assert_allclose(stats["previous_token"], [1.0, np.mean(1 / (i + 1)), 0.0])
  np.testing.assert_allclose(stats["separator"], [1 / (t - 1), np.mean(1 / (i + 1)), 0.0])
  np.testing.assert_allclose(stats["future"], [0.0, 0.0, np.mean(i < t - 1)])


@pytest.fixture(scope="module")
def eager(tiny_checkpoints):
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints["tiny_llama"]),
                                              dtype=torch.float32,
                                              attn_implementation="eager").eval()


def _tokens(b=3, t=17, vocab=307, seed=0):
  return np.random.default_rng(seed).integers(3, vocab, size=(b, t)).astype(np.int32)


def test_trace_states_and_probabilities_match_transformers(models, eager):
  model, _ = models
  tokens = _tokens()
  h, out = tracing.trace(model, jnp.asarray(tokens), emit=("states", "probs", "deltas"))
  with torch.no_grad():
    ref = eager(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True,
                output_attentions=True)
  n = model.cfg.num_layers
  for l in range(n - 1):  # transformers' last hidden state is after the final norm
    np.testing.assert_allclose(out["states"][l], ref.hidden_states[l + 1].numpy(), atol=2e-5)
  np.testing.assert_allclose(model.logits(h), ref.logits.numpy(), atol=1e-4)
  b, t = tokens.shape
  for l in range(n):
    probs = np.asarray(out["probs"][l]).reshape(b, -1, t, t)
    np.testing.assert_allclose(probs, ref.attentions[l].numpy(), atol=1e-6)
  np.testing.assert_allclose(out["deltas"][1], out["states"][1] - out["states"][0], atol=1e-6)


def _torch_patched(eager, tokens, clean, positions, layer, head=None, head_dim=None):
  """transformers' logits on `tokens` with decoder layer `layer`'s contribution (or one head's
  input to o_proj) at `positions` taken from a run on `clean`, by forward hooks."""
  at = torch.tensor(positions)[None, :, None]
  saved = {}
  layers = eager.model.layers

  def grab_layer(module, args, kwargs, output):
    h_in = args[0] if args else kwargs["hidden_states"]
    h_out = output[0] if isinstance(output, tuple) else output
    saved["delta"] = h_out - h_in

  def put_layer(module, args, kwargs, output):
    h_in = args[0] if args else kwargs["hidden_states"]
    h_out = output[0] if isinstance(output, tuple) else output
    new = torch.where(at, h_in + saved["delta"], h_out)
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

  def grab_head(module, args):
    saved["heads"] = args[0].clone()

  def put_head(module, args):
    x = args[0].clone()
    cut = slice(head * head_dim, (head + 1) * head_dim)
    x[..., cut] = torch.where(at, saved["heads"][..., cut], x[..., cut])
    return (x,)

  if head is None:
    grab = layers[layer].register_forward_hook(grab_layer, with_kwargs=True)
  else:
    grab = layers[layer].self_attn.o_proj.register_forward_pre_hook(grab_head)
  with torch.no_grad():
    eager(torch.tensor(clean, dtype=torch.long))
  grab.remove()
  if head is None:
    put = layers[layer].register_forward_hook(put_layer, with_kwargs=True)
  else:
    put = layers[layer].self_attn.o_proj.register_forward_pre_hook(put_head)
  with torch.no_grad():
    logits = eager(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  put.remove()
  return logits


def test_layer_and_head_patching_match_transformers_hooks(models, eager):
  model, _ = models
  cfg = model.cfg
  clean, corrupt = _tokens(seed=1), _tokens(seed=2)
  _, other = tracing.trace(model, jnp.asarray(clean), emit=("deltas", "heads"))
  positions = np.isin(np.arange(clean.shape[1]), [2, 5, 16])
  empty = tracing.no_patch(positions, other["deltas"], other["heads"])
  for layer in range(cfg.num_layers):
    patch = empty._replace(layers=empty.layers.at[layer].set(True))
    h, _ = tracing.trace(model, jnp.asarray(corrupt), patch=patch)
    ref = _torch_patched(eager, corrupt, clean, positions, layer)
    np.testing.assert_allclose(model.logits(h), ref, atol=1e-4)
  for layer, head in ((0, 0), (1, 4), (2, 5)):
    patch = empty._replace(heads=empty.heads.at[layer, head].set(True))
    h, _ = tracing.trace(model, jnp.asarray(corrupt), patch=patch)
    ref = _torch_patched(eager, corrupt, clean, positions, layer, head, cfg.head_dim)
    np.testing.assert_allclose(model.logits(h), ref, atol=1e-4)


def test_patching_profile_against_closed_forms(models):
  model, _ = models
  cfg = model.cfg
  clean, corrupt = _tokens(seed=3, t=12), _tokens(seed=4, t=12)
  answer, other = np.array([5, 6, 7]), np.array([8, 9, 10])
  _, clean_trace = tracing.trace(model, jnp.asarray(clean), emit=("deltas", "heads", "states"))
  everywhere = tracing.no_patch(np.ones(12, bool), clean_trace["deltas"], clean_trace["heads"])
  every = everywhere._replace(layers=jnp.ones(cfg.num_layers, bool))
  # A run patched with every block of a run on the same input is that run (restores 100%).
  h_self, _ = tracing.trace(model, jnp.asarray(clean), patch=every)
  np.testing.assert_allclose(h_self, clean_trace["states"][-1], atol=1e-5)
  # On another input every block patched leaves only the embedding difference:
  # h_L = h_0(corrupt) + sum of the clean deltas = h_L(clean) - h_0(clean) + h_0(corrupt).
  h_every, _ = tracing.trace(model, jnp.asarray(corrupt), patch=every)
  expected = (clean_trace["states"][-1] - model.embed_tokens(jnp.asarray(clean))
              + model.embed_tokens(jnp.asarray(corrupt)))
  np.testing.assert_allclose(h_every, expected, atol=1e-5)
  # The profile's entries are the restoration formula on runs patched at the read position.
  empty = tracing.no_patch(np.arange(12) == 10, clean_trace["deltas"], clean_trace["heads"])
  items = tasks.Items(clean, corrupt, position=11, answer=answer, corrupt_answer=other, cue=0)
  profile = patching.patching_profile(patching.Subject(model, None, 1), items,
                                      head_layers=1)
  none, _ = patching.read_logits(model, jnp.asarray(corrupt), None, empty, 10)
  assert patching.logit_difference(none, answer, other) == pytest.approx(profile["ld_corrupt"],
                                                                        abs=1e-4)
  for layer in range(cfg.num_layers):
    one = empty._replace(layers=empty.layers.at[layer].set(True))
    patched, _ = patching.read_logits(model, jnp.asarray(corrupt), None, one, 10)
    expected = ((patching.logit_difference(patched, answer, other) - profile["ld_corrupt"])
                / (profile["ld_clean"] - profile["ld_corrupt"]))
    assert profile["layers"][layer] == pytest.approx(expected, rel=1e-5)
  assert len(profile["heads"]) == 1 and len(next(iter(profile["heads"].values()))) == cfg.num_heads


def test_early_share_closed_form():
  assert patching.early_share(np.array([0.6, 0.0, -0.2, 0.2, 0.1, 0.1])) == pytest.approx(0.6)
  assert patching.early_share(np.array([0.0, 0.0, 0.5, 0.5, 0.5])) == pytest.approx(0.0)
  assert math.isnan(patching.early_share(np.array([-0.1, 0.0, -0.3])))


def test_head_concentration_closed_form():
  from dihal_jax.analysis.mechanism import head_concentration
  assert head_concentration({3: [0.6, 0.2, -0.1, 0.2], 5: [0.1, 0.1, 0.1, 0.1]}) == pytest.approx(
      (0.6 + 0.25) / 2)
  assert math.isnan(head_concentration({}))


def test_determined_bigrams_on_a_hand_made_stream():
  # 1 -> 2 (4 of 4), 2 -> 3 (4 of 4), 3 -> 4 (3 of 4), 4 -> 1 (2 of 3), 5 and 7 once
  stream = np.array([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 7, 1, 2, 3, 4, 5, 6])
  assert tasks.determined_bigrams(stream, min_count=3, min_share=0.9, exclude=set()) == {
      1: 2, 2: 3}
  assert tasks.determined_bigrams(stream, min_count=3, min_share=0.75, exclude=set()) == {
      1: 2, 2: 3, 3: 4}
  assert tasks.determined_bigrams(stream, min_count=3, min_share=0.6, exclude=set()) == {
      1: 2, 2: 3, 3: 4, 4: 1}
  # without the pairs that touch 3: 1 -> 2 (4 of 4), 4 -> 1 (2 of 3)
  assert tasks.determined_bigrams(stream, min_count=3, min_share=0.6, exclude={3}) == {
      1: 2, 4: 1}


def _streams(seed=0):
  rng = np.random.default_rng(seed)
  # a language: 10 -> 11 and 12 -> 13 always; the rest random tokens 20..99
  words = []
  for _ in range(7000):
    words += [10, 11] if rng.random() < 0.1 else ([12, 13] if rng.random() < 0.1 else
                                                  [int(rng.integers(20, 100))])
  return np.array(words[:4000]), np.array(words[4000:])


def test_bigram_items_structure_and_determinism():
  train, test = _streams()
  items = tasks.bigram_items(train, test, num=16, position=6, separator=0, mask_id=1, masks=2,
                             seed=3)
  again = tasks.bigram_items(train, test, num=16, position=6, separator=0, mask_id=1, masks=2,
                             seed=3)
  other = tasks.bigram_items(train, test, num=16, position=6, separator=0, mask_id=1, masks=2,
                             seed=4)
  np.testing.assert_array_equal(items.clean, again.clean)
  assert not np.array_equal(items.clean, other.clean)
  assert items.clean.shape == (16, 8) and (items.clean[:, 0] == 0).all()
  assert (items.clean[:, 6:] == 1).all()
  differ = items.clean != items.corrupt
  assert (differ.sum(axis=1) == 1).all() and differ[:, 5].all() and items.cue == 5
  table = {10: 11, 12: 13}
  assert [table[a] for a in items.clean[:, 5]] == items.answer.tolist()
  assert [table[a] for a in items.corrupt[:, 5]] == items.corrupt_answer.tolist()
  assert (items.answer != items.corrupt_answer).all()


def test_copy_items_structure_and_determinism():
  _, test = _streams()
  words = np.arange(20, 100)
  kwargs = dict(num=12, span=4, filler=5, separator=0, mask_id=1, masks=3)
  items = tasks.copy_items(test, words, seed=0, **kwargs)
  np.testing.assert_array_equal(items.clean, tasks.copy_items(test, words, seed=0, **kwargs).clean)
  assert not np.array_equal(items.clean, tasks.copy_items(test, words, seed=1, **kwargs).clean)
  assert items.position == 13 and items.cue == 4 and items.clean.shape == (12, 16)
  c = items.clean
  np.testing.assert_array_equal(c[:, 10:13], c[:, 1:4])  # the span again, without its last
  np.testing.assert_array_equal(items.answer, c[:, 4])
  np.testing.assert_array_equal(items.corrupt_answer, items.corrupt[:, 4])
  differ = items.clean != items.corrupt
  assert (differ.sum(axis=1) == 1).all() and differ[:, 4].all()
  for row, answer in zip(c, items.answer):  # the answer occurs once, far back
    assert (row[:13] == answer).sum() == 1
  with pytest.raises(ValueError, match="copy task"):
    tasks.copy_items(test, np.array([20]), seed=0, **kwargs)
