"""Decoder-only transformer (Llama-3.x / Qwen3) in Flax NNX, with the DiHAL split.

Hidden-state index (docs/design.md): h_0 is the embedding output, h_l the output of
block l (1..L) *before* the final norm. `lower(tokens, l)` returns h_l,
`upper(h, l)` runs blocks l+1..L, the final norm and the LM head, so
`upper(lower(x, l), l) == forward(x)` for every l.

Blocks are stacked on a leading "layers" axis (created with `nnx.vmap`) and
run with `jax.lax.scan`, so compile time does not grow with depth and a layer
range is a slice of the stacked state.

Einsum letters: B batch, T query length, S key length, D model dim, N query
heads, K kv heads, G = N / K query heads per kv head, H head dim, F MLP dim,
V vocab.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dihal_jax.backbone import rope
from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import Rules, param_shardings

_INIT = nnx.initializers.normal(0.02)
_MASKED = -1e30  # finite: a fully masked row (padding query) gives a uniform softmax, not NaN


_ONES = object()

# `model.attention`: how attention is computed. "reference" spells out the float32
# [B, K, G, T, S] probabilities (`Attention.probabilities` / `heads`); "xla" and "cudnn" are
# `jax.nn.dot_product_attention`'s kernels; "auto" = cudnn where it applies, else xla.
ATTENTION = ("auto", "xla", "cudnn", "reference")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_attention(name: str) -> None:
  """One error line for a `model.attention` that names no kernel."""
  if name not in ATTENTION:
    raise UserInputError(f"--config.model.attention={name!r}: expected one of "
                         f"{', '.join(ATTENTION)}")


def attention_kernel(name: str, dtype, head_dim: int, query_len: int, key_len: int,
                     platform: str) -> str:
  """The kernel `model.attention=name` runs for these shapes: reference, xla or cudnn.

  cuDNN's flash attention takes only bf16/fp16, head dims that are multiples of 8 up
  to 128 (256 from Hopper on), and, when differentiated with a mask, even lengths;
  "auto" takes it only inside those bounds, on a GPU.
  """
  check_attention(name)
  fits_cudnn = (jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
                and query_len % 2 == 0 and key_len % 2 == 0)
  if name == "auto":
    return "cudnn" if platform == "gpu" and fits_cudnn else "xla"
  if name == "cudnn" and platform != "gpu":
    raise UserInputError(f"--config.model.attention=cudnn: needs a GPU (the platform is "
                         f"{platform}); use auto or xla")
  if name == "cudnn" and jnp.dtype(dtype) not in _CUDNN_DTYPES:
    raise UserInputError(f"--config.model.attention=cudnn: needs --config.model.dtype="
                         f"bfloat16 or float16 (not {jnp.dtype(dtype).name}); use auto or xla")
  return name


def _matmul(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """einsum in `dtype` with float32 accumulation, result cast back to `dtype`.

  With dtype=bfloat16 the operands are bf16 (the fast path of TPU/GPU MXUs and
  of XLA:CPU's bf16 dots) but sums are float32, as MaxText's DenseGeneral does.
  """
  out = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return out.astype(dtype)


def _param(rngs: nnx.Rngs, shape, names, dtype, init=_INIT) -> nnx.Param:
  """A parameter annotated with logical axis names (see `parallel.sharding`).

  The names live under `logical_axes`, not Flax's `out_sharding`, because the
  mapping to mesh axes is ours (config rules, divisibility fallback); stacked
  blocks get a leading "layers" name from `param_shardings`.
  """
  value = jnp.ones(shape, dtype) if init is _ONES else init(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=tuple(names))


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32 (HF `LlamaRMSNorm`)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, (dim,), ("norm",), param_dtype, init=_ONES)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (self.scale[...].astype(jnp.float32) * (x32 * jax.lax.rsqrt(var + self.eps))).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional q/k RMSNorm (Qwen3) and biases.

  `kernel` is a `model.attention` value (see `ATTENTION`), resolved per call by
  `attention_kernel` from the traced shapes and the platform.
  """

  def __init__(self, cfg: BackboneConfig, *, dtype, param_dtype, kernel: str = "auto",
               rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    check_attention(kernel)
    self.dtype = dtype
    self.kernel = kernel
    self.scale = h ** -0.5
    self.q_proj = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), param_dtype)
    self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), param_dtype)
    if cfg.attention_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = _param(rngs, (n, h), ("q_heads", "head_dim"), param_dtype, init=zeros)
      self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, init=zeros)
      self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, init=zeros)
      self.o_bias = _param(rngs, (d,), ("norm",), param_dtype, init=zeros)
    else:
      self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
      self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None

  def _project(self, x, kernel, bias, norm, cos, sin):
    y = _matmul("BTD,DNH->BTNH", x, kernel[...], self.dtype)
    if bias is not None:
      y = y + bias[...].astype(self.dtype)
    if norm is not None:
      y = norm(y)
    return y if cos is None else rope.apply_rotary(y, cos, sin)

  def queries_keys_values(self, x, cos, sin):
    """q [B, T, N, H], k and v [B, T, K, H] (RoPE applied to q and k)."""
    return (self._project(x, self.q_proj, self.q_bias, self.q_norm, cos, sin),
            self._project(x, self.k_proj, self.k_bias, self.k_norm, cos, sin),
            self._project(x, self.v_proj, self.v_bias, None, None, None))

  def probabilities(self, q, k, mask):
    """Attention probabilities [B, K, G, T, S] in float32 (G = N / K query heads per kv head);
    mask [B, T, S], True = attend."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(self.dtype),
                        preferred_element_type=jnp.float32) * self.scale
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
    return jax.nn.softmax(logits, axis=-1)

  def heads(self, probs, v):
    """Each head's output [B, T, N, H] before the output projection."""
    b, kv, g, t, _ = probs.shape
    return _matmul("BKGTS,BSKH->BTKGH", probs.astype(self.dtype), v,
                   self.dtype).reshape(b, t, kv * g, -1)

  def attend(self, q, k, v, mask):
    """Each head's output [B, T, N, H] for q [B, T, N, H], k and v [B, S, K, H], mask
    [B, T, S] (True = attend). A fully masked row (a padding query) averages all keys in
    every kernel: masked logits are finite, so its softmax is uniform, not NaN."""
    kernel = attention_kernel(self.kernel, self.dtype, q.shape[-1], q.shape[1], k.shape[1],
                              jax.default_backend())
    if kernel == "reference":
      return self.heads(self.probabilities(q, k, mask), v)
    return jax.nn.dot_product_attention(
        q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype), mask=mask[:, None],
        scale=self.scale, implementation=kernel)

  def output(self, heads):
    """The output projection (and bias) of the heads [B, T, N, H] -> [B, T, D]."""
    out = _matmul("BTNH,NHD->BTD", heads, self.o_proj[...], self.dtype)
    return out if self.o_bias is None else out + self.o_bias[...].astype(self.dtype)

  def __call__(self, x, cos, sin, mask, cache=None):
    """x [B, T, D]; mask [B, T, S] (True = attend); cache (k, v [B, S, K, H], index) or None.

    Returns the output [B, T, D] and the updated (k, v) cache (or None).
    """
    q, k, v = self.queries_keys_values(x, cos, sin)
    new_cache = None
    if cache is not None:
      k_cache, v_cache, index = cache
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
      new_cache = (k, v)
    return self.output(self.attend(q, k, v, mask)), new_cache


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: BackboneConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.dtype = dtype
    self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), param_dtype)
    if cfg.mlp_bias:
      zeros = nnx.initializers.zeros
      self.gate_bias = _param(rngs, (f,), ("mlp",), param_dtype, init=zeros)
      self.up_bias = _param(rngs, (f,), ("mlp",), param_dtype, init=zeros)
      self.down_bias = _param(rngs, (d,), ("norm",), param_dtype, init=zeros)
    else:
      self.gate_bias = self.up_bias = self.down_bias = None

  def _linear(self, x, kernel, bias):
    y = _matmul("BTD,DF->BTF", x, kernel[...], self.dtype)
    return y if bias is None else y + bias[...].astype(self.dtype)

  def __call__(self, x):
    hidden = jax.nn.silu(self._linear(x, self.gate_proj, self.gate_bias)) * self._linear(
        x, self.up_proj, self.up_bias)
    return self._linear(hidden, self.down_proj, self.down_bias)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: BackboneConfig, *, dtype, param_dtype, attention: str = "auto",
               rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.attn = Attention(cfg, dtype=dtype, kernel=attention, **kw)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, dtype=dtype, **kw)

  def __call__(self, x, cos, sin, mask, cache=None):
    attn_out, new_cache = self.attn(self.input_norm(x), cos, sin, mask, cache)
    return self.after_attention(x, attn_out), new_cache

  def after_attention(self, x, attn_out):
    """The rest of the block once attention's output is known: the two residual adds and
    the MLP (analysis/trace.py computes attn_out itself, head by head)."""
    x = x + attn_out
    return x + self.mlp(self.post_attn_norm(x))


class Decoder(nnx.Module):
  """The full backbone: embedding, L stacked blocks, final norm, LM head.

  Args:
    cfg: architecture.
    dtype: compute dtype of matmuls (norms, softmax and RoPE stay float32).
    param_dtype: storage dtype of parameters.
    attention: the attention kernel, a `model.attention` value (`ATTENTION`).
  """

  def __init__(self, cfg: BackboneConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "auto", rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers)
    def make_blocks(rngs):
      return Block(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)

    self.layers = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype,
                              rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else _param(
        rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

  # --- pieces -------------------------------------------------------------

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """h_0 [B, T, D] for tokens [B, T]."""
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

  def logits(self, h_last: jax.Array) -> jax.Array:
    """Final norm + LM head on h_L [B, T, D] -> float32 logits [B, T, V]."""
    x = self.final_norm(h_last)
    if self.lm_head is None:
      return jnp.einsum("BTD,VD->BTV", x, self.embed[...].astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def attention_context(self, tokens_shape, positions, mask, attention=None):
    """Default positions (0..T-1) and the attention mask [B, T, T]: `attention` ([T, T] or
    [B, T, T], True = query i sees key j; default causal) & the key-padding `mask`."""
    b, t = tokens_shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    pattern = jnp.tril(jnp.ones((t, t), bool)) if attention is None else attention.astype(bool)
    pattern = pattern if pattern.ndim == 3 else pattern[None]
    full_mask = pattern if mask is None else pattern & mask[:, None, :].astype(bool)
    cos, sin = rope.rotary_cos_sin(positions, rope.inverse_frequencies(self.cfg))
    return cos, sin, jnp.broadcast_to(full_mask, (b, t, t))

  def run_layers(self, h: jax.Array, start: int, stop: int, *, positions=None, mask=None,
                 emit: bool = False, attention=None):
    """Runs blocks start+1..stop (1-based) on h_start, returning h_stop.

    With `emit`, also returns every intermediate state stacked: [stop-start, B, T, D],
    entry i = h_{start+1+i} (one scan; the last entry is h_stop). `attention`: the
    attention pattern (see `attention_context`; default causal).
    """
    if not 0 <= start <= stop <= self.cfg.num_layers:
      raise ValueError(f"layer range ({start}, {stop}) outside 0..{self.cfg.num_layers}")
    if start == stop:
      return (h, h[None][:0]) if emit else h
    cos, sin, full_mask = self.attention_context(h.shape[:2], positions, mask, attention)
    graphdef, state = nnx.split(self.layers)
    state = jax.tree.map(lambda a: a[start:stop], state)

    def body(x, layer_state):
      x, _ = nnx.merge(graphdef, layer_state)(x, cos, sin, full_mask)
      return x, (x if emit else None)

    h, stack = jax.lax.scan(body, h, state)
    return (h, stack) if emit else h

  # --- the DiHAL interface ---------------------------------------------------

  def __call__(self, tokens: jax.Array, *, positions=None, mask=None,
               attention=None) -> jax.Array:
    """forward(tokens [B, T]) -> float32 logits [B, T, V]. mask [B, T]: True = real token;
    attention: [T, T] or [B, T, T] pattern, True = query i sees key j (default causal; a
    masked diffusion model passes a bidirectional one)."""
    chex.assert_rank(tokens, 2)
    h = self.run_layers(self.embed_tokens(tokens), 0, self.cfg.num_layers, positions=positions,
                        mask=mask, attention=attention)
    return self.logits(h)

  def lower(self, tokens: jax.Array, layer: int, *, positions=None, mask=None) -> jax.Array:
    """h_layer [B, T, D]: embedding, then blocks 1..layer."""
    chex.assert_rank(tokens, 2)
    return self.run_layers(self.embed_tokens(tokens), 0, layer, positions=positions, mask=mask)

  def upper(self, h: jax.Array, layer: int, *, positions=None, mask=None) -> jax.Array:
    """Logits [B, T, V] from h_layer: blocks layer+1..L, final norm, LM head."""
    chex.assert_rank(h, 3)
    chex.assert_axis_dimension(h, 2, self.cfg.hidden_size)
    return self.logits(self.run_layers(h, layer, self.cfg.num_layers, positions=positions,
                                       mask=mask))

  def hidden_states(self, tokens: jax.Array, layers: Sequence[int], *, positions=None,
                    mask=None, with_logits: bool = False):
    """{l: h_l} for the requested layers from one scan over blocks 1..deepest.

    The scan emits every state up to the deepest requested layer (one compiled
    loop, flat compile time); use `lower` when a single layer is needed. With
    `with_logits`, the scan runs to L and the logits are returned as well.
    """
    wanted = sorted(set(int(l) for l in layers))
    if wanted and not 0 <= wanted[0] <= wanted[-1] <= self.cfg.num_layers:
      raise ValueError(f"layers {wanted} outside 0..{self.cfg.num_layers}")
    stop = self.cfg.num_layers if with_logits else (wanted[-1] if wanted else 0)
    h0 = self.embed_tokens(tokens)
    h_last, stack = self.run_layers(h0, 0, stop, positions=positions, mask=mask, emit=True)
    out = {l: (h0 if l == 0 else stack[l - 1]) for l in wanted}
    return (out, self.logits(h_last)) if with_logits else out

  def decode_step(self, tokens, positions, cache_k, cache_v, index, key_mask, *,
                  embeddings=None):
    """One cached step: tokens [B, T] at cache slots index..index+T-1.

    Args:
      tokens: [B, T] new tokens (None when `embeddings` are given).
      positions: [B, T] their RoPE positions.
      cache_k, cache_v: [L, B, S, K, H] caches.
      index: first cache slot written.
      key_mask: [B, S] True where a slot holds a real token (padding False).
      embeddings: [B, T, D] input vectors instead of the tokens' embeddings (soft prompts).
    Returns:
      logits [B, T, V] and the updated caches.
    """
    x = self.embed_tokens(tokens) if embeddings is None else embeddings
    t = x.shape[1]
    s = cache_k.shape[2]
    q_slot = index + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :].astype(bool)
    cos, sin = rope.rotary_cos_sin(positions, rope.inverse_frequencies(self.cfg))
    graphdef, state = nnx.split(self.layers)

    def body(x, xs):
      layer_state, k_l, v_l = xs
      x, (k_l, v_l) = nnx.merge(graphdef, layer_state)(x, cos, sin, mask, (k_l, v_l, index))
      return x, (k_l, v_l)

    h, (cache_k, cache_v) = jax.lax.scan(body, x, (state, cache_k, cache_v))
    return self.logits(h), cache_k, cache_v


def init_model(cfg: BackboneConfig, *, mesh: jax.sharding.Mesh, rules: Rules, seed: int = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "auto") -> Decoder:
  """A randomly initialized Decoder whose params are born sharded (never whole on one device)."""
  make = lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention,
                         rngs=nnx.Rngs(seed))
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  out = jax.tree.map(lambda v: v.get_value(), param_shardings(abstract, mesh, rules),
                     is_leaf=lambda x: isinstance(x, nnx.Variable))
  state = jax.jit(lambda: nnx.state(make()), out_shardings=out)()
  return nnx.merge(graphdef, state)
