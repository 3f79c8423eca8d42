"""One optimizer step of the bridge denoiser, data parallel over a device mesh.

What: the training loop's body. Given standardized hidden states x0 [B, n, d],
it draws per-example times t ~ U(1e-3, 1), a known-position mask (position 0
always; random prefixes and spans, DESIGN "Bridge"), and Gaussian noise; builds
x_t = q_sample(x0, t, noise) with the *clean* x0 imposed at known positions
(the denoiser also receives known = x0 * mask as its conditioning input); takes
the diffusion loss over the unknown positions; applies AdamW with global-norm
clipping and a warmup-cosine learning rate; and updates an EMA of the params
(decay warmed up as min(decay, (1 + k)/(10 + k))). Options: self-conditioning
(a denoiser built with self_condition gets a stop-gradient first-pass x0 estimate
for half the examples), class labels with label dropout (for guidance), and an
auxiliary token loss: token_ce · cross-entropy of the true tokens at the unknown
positions under the current-token head (bridge/token_head.py) applied to the x0
estimate, which asks the denoiser for states that decode to the right tokens, not
only for a small MSE; and the upper-layer token loss (`UpperCE`): the x0 estimates of
a few windows per step, in backbone units, through the frozen upper layers and LM head,
with the cross-entropy of the true next tokens, which brings the backbone's own
knowledge of language into the bridge's gradient.

Why this way:
- Every random draw comes from `fold_in(key, state.step)`: the caller passes
  one base key for the whole run, so a step is reproducible from (state, key)
  alone, and resuming from a checkpoint repeats the same draws.
- Known positions hold clean x0 in x_t: the diffusion module found RePaint's
  noised re-imposition biased, and the sampler sets them exactly as well.
- Data parallelism is the `jit`-with-shardings flavour: the batch is sharded
  over the mesh's batch axes (`batch_sharding`), params / optimizer state /
  EMA follow `param_shardings` (replicated under DEFAULT_RULES, whose UNet
  axes map to None), and XLA inserts the gradient all-reduce itself. The same
  jitted function runs on 1..N devices; only the mesh changes.
- The state is donated (`donate_argnums=0`): params, optimizer moments and
  EMA are updated in place, never twice in memory.

Usage:
  model = UNet(d, UNetConfig(), rngs=nnx.Rngs(0))
  optim_cfg = OptimConfig(lr=3e-4, total_steps=10_000)
  state = init_train_state(model, make_optimizer(optim_cfg))
  step = make_train_step(DiffusionConfig(), optim_cfg, make_mesh({"data": -1}), DEFAULT_RULES)
  key = jax.random.key(seed)
  for batch in batches:                           # [B, n, d] standardized h_l
    state, metrics = step(state, batch, key)      # the same key every step
  ema_model = nnx.merge(state.graphdef, state.ema, state.rest)
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from dihal_jax.bridge import diffusion
from dihal_jax.bridge.token_head import class_scores
from dihal_jax.parallel.sharding import Rules, batch_sharding, param_shardings, put_global

T_MIN = 1e-3  # training times t ~ U(T_MIN, 1): avoids the degenerate t = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + global-norm clipping + warmup-cosine schedule + EMA (hashable)."""

  lr: float = 3e-4            # peak learning rate
  warmup_steps: int = 100     # linear warmup 0 -> lr
  total_steps: int = 1000     # cosine decay lr -> 0 ends here (warmup included)
  weight_decay: float = 0.01  # decoupled; only on matrices / conv kernels (ndim >= 2)
  clip_norm: float = 1.0      # global gradient norm clip
  ema_decay: float = 0.999   # the EMA's final decay
  ema_warmup: bool = True     # decay_k = min(ema_decay, (1 + k) / (10 + k)) at step k
  b1: float = 0.9
  b2: float = 0.99


def _schedule(cfg: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.total_steps, end_value=0.0)


def learning_rate(cfg: OptimConfig, step) -> float:
  """The learning rate used by the update at `step` (0-based).

  lr·step/warmup during warmup, then lr·(1 + cos(π·(step - warmup)/(total - warmup)))/2,
  0 from total_steps on.
  """
  return float(_schedule(cfg)(step))


def ema_decay_at(cfg: OptimConfig, step):
  """The EMA decay used by the update at `step` (0-based): with warm-up,
  min(ema_decay, (1 + step) / (10 + step)), so a short run's EMA is not stuck
  near the initial params (at 0.999 it would take ~1000 steps to forget them)."""
  if not cfg.ema_warmup:
    return jnp.asarray(cfg.ema_decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))


def _decay_mask(params):
  """True for parameters with ndim >= 2 (no weight decay on biases and norm scales)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) followed by AdamW on the warmup-cosine schedule."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=_decay_mask))


def sample_known_mask(key: jax.Array, batch: int, n: int, *, p_prefix: float = 0.5,
                      p_span: float = 0.25) -> jax.Array:
  """bool [batch, n]: which positions are given clean to the denoiser.

  Position 0 is always known (the bridge's anchor). Per row, with probability
  p_prefix a prefix 0..L-1 with L uniform in 1..n-1; with probability p_span
  position 0 plus a span s..e-1 with s uniform in 1..n-1 and e uniform in
  s+1..n; otherwise only position 0. (L = 1 and s = 1 give masks that look like
  "only 0" and "prefix" respectively.)
  """
  if n < 2:
    return jnp.ones((batch, n), bool)
  if not (0.0 <= p_prefix and 0.0 <= p_span and p_prefix + p_span <= 1.0):
    raise ValueError(f"sample_known_mask: p_prefix={p_prefix}, p_span={p_span} must be "
                     ">= 0 and sum to <= 1")
  k_kind, k_len, k_start, k_end = jax.random.split(key, 4)
  u = jax.random.uniform(k_kind, (batch,))
  length = jax.random.randint(k_len, (batch,), 1, n)                     # 1..n-1
  start = jax.random.randint(k_start, (batch,), 1, n)                    # 1..n-1
  # e uniform in s+1..n: floor(v·(n - s)) is uniform in 0..n-s-1.
  v = jax.random.uniform(k_end, (batch,))
  end = start + 1 + jnp.minimum(jnp.floor(v * (n - start)).astype(jnp.int32), n - start - 1)
  pos = jnp.arange(n)[None, :]
  prefix = pos < length[:, None]
  span = (pos == 0) | ((pos >= start[:, None]) & (pos < end[:, None]))
  only0 = jnp.broadcast_to(pos == 0, (batch, n))
  kind_prefix = (u < p_prefix)[:, None]
  kind_span = ((u >= p_prefix) & (u < p_prefix + p_span))[:, None]
  return jnp.where(kind_prefix, prefix, jnp.where(kind_span, span, only0))


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree; graphdef is static).

  Attributes:
    graphdef: the denoiser's structure (nnx.split), static.
    params: nnx.State of the nnx.Param variables.
    rest: every other variable (dropout RNG streams); reseeded each step, unchanged.
    opt_state: the optax state of `make_optimizer`.
    ema: exponential moving average of params (same structure).
    step: int32 scalar, number of steps taken.
  """

  graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  ema: nnx.State
  step: jax.Array

  def model(self, ema: bool = False) -> nnx.Module:
    """The denoiser with the current (or EMA) parameters."""
    return nnx.merge(self.graphdef, self.ema if ema else self.params, self.rest)

  def checkpoint_items(self) -> dict:
    """The arrays a checkpoint holds (everything but the static graphdef)."""
    return {"params": self.params, "rest": self.rest, "opt_state": self.opt_state,
            "ema": self.ema, "step": self.step}


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0: params from `model`, fresh optimizer state, EMA = a copy of the params."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # A real copy: the state is donated, and params and ema must not share buffers.
  ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
  return TrainState(graphdef=graphdef, params=params, rest=rest,
                    opt_state=optimizer.init(params), ema=ema,
                    step=jnp.zeros((), jnp.int32))


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation,
                    optim_cfg: OptimConfig) -> TrainState:
  """The end of every trainer's step: the optimizer's update of `grads`, the EMA at
  `ema_decay_at(step)`, step + 1."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(optim_cfg, state.step)
  ema = optax.incremental_update(params, state.ema, step_size=1.0 - decay)
  return state.replace(params=params, opt_state=opt_state, ema=ema, step=state.step + 1)


def _reseed(model: nnx.Module, key: jax.Array) -> None:
  """Gives every RNG stream of `model` (dropout) its own key derived from `key`."""
  i = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.RngStream):
      node.key.set_value(jax.random.fold_in(key, i))
      node.count.set_value(jnp.zeros((), jnp.uint32))
      i += 1


def token_loss(x0_hat: jax.Array, tokens: jax.Array, unknown_mask: jax.Array,
               head: dict) -> jax.Array:
  """Mean -log p_id(true token | x0_hat) over the unknown positions (0 when there are none).

  head: {"means": [V', d] class means (normalized space), "class_of": [V] int32 row of each
  token id, "tau": scalar} from a ClassMeanHead.
  """
  logp = jax.nn.log_softmax(class_scores(x0_hat, head["means"]) / head["tau"], axis=-1)
  nll = -jnp.take_along_axis(logp, head["class_of"][tokens][..., None], axis=-1)[..., 0]
  weight = jnp.asarray(unknown_mask, jnp.float32)
  return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


@dataclasses.dataclass(frozen=True)
class UpperCE:
  """The upper-layer token loss's static settings (hashable: a jit static): its weight, the
  windows of each batch it reads (each costs a pass through the upper layers and back), the
  interface layer and the backbone's graphdef. Its arrays come per call as `upper`:
  {"backbone": the backbone's nnx.State, "norm": the bridge's Normalizer}."""

  weight: float
  windows: int
  layer: int
  graphdef: nnx.GraphDef


def upper_token_loss(x0_hat: jax.Array, tokens: jax.Array, unknown_mask: jax.Array,
                     upper: dict, cfg: UpperCE) -> jax.Array:
  """Mean -log p_LM(token i | x0_hat at positions < i) over the positions i whose token is
  unknown, for the first cfg.windows windows; x0_hat in normalized units (position 0 and
  the other known positions should hold the clean values)."""
  k = cfg.windows
  norm = upper["norm"]
  backbone = nnx.merge(cfg.graphdef, upper["backbone"])
  logits = backbone.upper(norm.inverse(x0_hat[:k]), cfg.layer)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:k, 1:, None], axis=-1)[..., 0]
  weight = jnp.asarray(unknown_mask[:k, 1:], jnp.float32)
  return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def draw_corruption(keys, x0: jax.Array, logit_normal: tuple[float, float] | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(t [B], known_mask [B, n], noise [B, n, d]): the training distribution's draws for clean
  windows x0 [B, n, d] -- t ~ U(T_MIN, 1), or with logit_normal = (mean, std) logit(t) ~
  N(mean, std) clipped to [T_MIN, 1) (SD3's time sampling); `sample_known_mask`; ε ~ N(0, I).
  keys: (k_t, k_mask, k_noise)."""
  k_t, k_mask, k_noise = keys
  b, n, _ = x0.shape
  if logit_normal is None:
    t = jax.random.uniform(k_t, (b,), jnp.float32, T_MIN, 1.0)
  else:
    mean, std = logit_normal
    t = jnp.maximum(jax.nn.sigmoid(mean + std * jax.random.normal(k_t, (b,), jnp.float32)),
                    T_MIN)
  return t, sample_known_mask(k_mask, b, n), jax.random.normal(k_noise, x0.shape, jnp.float32)


def objective(model: nnx.Module, x0: jax.Array, noise: jax.Array, t: jax.Array,
              known_mask: jax.Array, cfg: diffusion.DiffusionConfig, *,
              labels: jax.Array | None = None, self_condition: jax.Array | bool | None = None,
              deterministic: bool = True, x_t: jax.Array | None = None):
  """The diffusion objective of the bridge: (loss, model output, x_t).

  Known positions are given clean (`known`), the others noised to level t; the loss is
  `diffusion.loss` (MSE to the prediction target over the unknown positions). Training,
  validation and the plan's autodiff residuals all compute it here.

  Args:
    self_condition: for a denoiser with `cfg.self_condition`, which examples ([B] bool, or
      True = all) see the first pass's x0 estimate (stop-gradient) in a second pass; the
      others see zeros. None: one pass only, x0_prev None (as at the first sampling step).
    x_t: the noised input when the caller already has it (default: from x0, noise, t).
  """
  mask = known_mask[..., None]
  if x_t is None:
    x_t = jnp.where(mask, x0, diffusion.q_sample(x0, t, noise, cfg.schedule))
  known = jnp.where(mask, x0, 0.0)
  x0_prev = None
  if self_condition is not None and model.cfg.self_condition:
    first = model(x_t, t, known_mask, known, labels, deterministic=deterministic)
    estimate = jax.lax.stop_gradient(diffusion.predict_x0_eps(first, x_t, t, cfg)[0])
    x0_prev = (estimate if self_condition is True
               else jnp.where(jnp.asarray(self_condition)[:, None, None], estimate, 0.0))
  out = model(x_t, t, known_mask, known, labels, x0_prev, deterministic=deterministic)
  return diffusion.loss(out, x0, noise, t, ~known_mask, cfg), out, x_t


def train_step(state: TrainState, batch_x0: jax.Array, key: jax.Array,
               labels: jax.Array | None = None, tokens: jax.Array | None = None,
               head: dict | None = None, upper: dict | None = None, *,
               diffusion_cfg: diffusion.DiffusionConfig,
               optimizer: optax.GradientTransformation,
               optim_cfg: OptimConfig,
               self_condition_prob: float = 0.5,
               label_dropout: float = 0.1,
               token_ce: float = 0.0,
               logit_normal: tuple[float, float] | None = None,
               upper_ce: UpperCE | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on the diffusion loss (un-jitted; see `make_train_step`).

  Args:
    state: the TrainState.
    batch_x0: [B, n, d] standardized hidden states.
    key: the run's base PRNG key; this step's draws come from fold_in(key, state.step).
    labels: [B] int class ids (only for a UNet with num_classes > 0); each is
      replaced by NULL_LABEL with probability `label_dropout`, which trains the
      unconditional model classifier-free guidance needs.
    diffusion_cfg: schedule and prediction target (static).
    optimizer: from `make_optimizer` (static).
    optim_cfg: its settings; the EMA decay follows `ema_decay_at`.
    self_condition_prob: for a denoiser with self_condition, the share of examples
      whose second pass sees the first pass's x0 estimate (stop-gradient,
      Analog Bits); the others see zeros, as at the first sampling step.
    label_dropout: see `labels`.
    tokens, head, token_ce: [B, n] the windows' tokens, the current-token head (see
      `token_loss`) and the weight of the token loss (0 = off; then both may be None).
    logit_normal: (mean, std) of logit(t) for the training times (None: uniform t); see
      `draw_corruption`.
    upper, upper_ce: the upper-layer token loss's arrays and settings (`UpperCE`; None =
      off); it needs `tokens`.
  Returns:
    (new state, {"loss": total, "mse": the diffusion loss, "token_ce": the token loss (0 when
    off), "upper_ce": the upper-layer token loss (0 when off), "grad_norm": before
    clipping}).
  """
  chex.assert_rank(batch_x0, 3)
  b, n, _ = batch_x0.shape
  x0 = jnp.asarray(batch_x0, jnp.float32)
  k_t, k_mask, k_noise, k_drop, k_sc, k_label = jax.random.split(
      jax.random.fold_in(key, state.step), 6)
  t, known_mask, noise = draw_corruption((k_t, k_mask, k_noise), x0, logit_normal)
  use = jax.random.bernoulli(k_sc, self_condition_prob, (b,))
  if labels is not None:
    chex.assert_shape(labels, (b,))
    dropped = jax.random.bernoulli(k_label, label_dropout, (b,))
    labels = jnp.where(dropped, diffusion.NULL_LABEL, labels)

  def loss_fn(params):
    model = nnx.merge(state.graphdef, params, state.rest, copy=True)
    _reseed(model, k_drop)
    mse, out, x_t = objective(model, x0, noise, t, known_mask, diffusion_cfg, labels=labels,
                              self_condition=use, deterministic=False)
    ce = uce = jnp.zeros((), jnp.float32)
    x0_hat = diffusion.predict_x0_eps(out, x_t, t, diffusion_cfg)[0]
    if token_ce:
      ce = token_loss(x0_hat, tokens, ~known_mask, head)
    if upper_ce is not None:
      uce = upper_token_loss(jnp.where(known_mask[..., None], x0, x0_hat), tokens, ~known_mask,
                             upper, upper_ce)
    weight = 0.0 if upper_ce is None else upper_ce.weight
    return mse + token_ce * ce + weight * uce, (mse, ce, uce)

  (loss, (mse, ce, uce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = apply_gradients(state, grads, optimizer, optim_cfg)
  metrics = {"loss": loss, "mse": mse, "token_ce": ce, "upper_ce": uce,
             "grad_norm": optax.tree.norm(grads)}
  return new_state, metrics


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh, rules: Rules,
                    optimizer: optax.GradientTransformation) -> TrainState:
  """A TrainState-shaped tree of NamedShardings: params, EMA and the optimizer's
  per-parameter moments per `param_shardings`, everything else replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  params = param_shardings(state.params, mesh, rules)  # Variables holding shardings
  opt = optax.tree_utils.tree_map_params(
      optimizer, lambda _, s: s, state.opt_state, params,
      transform_non_params=lambda _: replicated)
  rest = jax.tree.map(lambda _: replicated, state.rest)
  return state.replace(params=params, rest=rest, opt_state=opt, ema=params, step=replicated)


def lowered_flops(jitted, *args) -> float | None:
  """XLA's count of the floating-point operations of one call of `jitted` on `args` (a
  matmul of [m, k] by [k, n] counts 2mkn), read from the lowered program without
  compiling it; None where the backend gives no count. Arrays in `args` are not used."""
  cost = jitted.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def jit_train_step(state: TrainState, mesh: jax.sharding.Mesh, rules: Rules,
                   diffusion_cfg: diffusion.DiffusionConfig,
                   optimizer: optax.GradientTransformation, optim_cfg: OptimConfig, *,
                   labels: bool = False, self_condition_prob: float = 0.5,
                   label_dropout: float = 0.1, token_ce: float = 0.0,
                   logit_normal: tuple[float, float] | None = None,
                   upper_ce: UpperCE | None = None, upper_shardings=None):
  """(`train_step` jitted for `mesh`, the state's shardings): called as (state, batch
  [B, n, d], key, labels, tokens, head, upper), the batch split over the batch axes, labels
  (when `labels`) too, tokens with token_ce > 0 or upper_ce, head only with token_ce > 0,
  upper (placed at `upper_shardings`) only with upper_ce; the state is donated. The one
  jit/sharding/donation wiring of the step (`make_train_step`, `planning/aot.py`)."""
  x_sharding = batch_sharding(mesh, rules, 3)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = state_shardings(state, mesh, rules, optimizer)
  fn = functools.partial(train_step, diffusion_cfg=diffusion_cfg, optimizer=optimizer,
                         optim_cfg=optim_cfg, self_condition_prob=self_condition_prob,
                         label_dropout=label_dropout, token_ce=token_ce,
                         logit_normal=logit_normal, upper_ce=upper_ce)
  needs_tokens = bool(token_ce) or upper_ce is not None
  jitted = jax.jit(fn, in_shardings=(shardings, x_sharding, replicated,
                                     batch_sharding(mesh, rules, 1) if labels else None,
                                     batch_sharding(mesh, rules, 2) if needs_tokens else None,
                                     replicated if token_ce else None,
                                     upper_shardings if upper_ce is not None else None),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
  return jitted, shardings


def make_train_step(diffusion_cfg: diffusion.DiffusionConfig, optim_cfg: OptimConfig,
                    mesh: jax.sharding.Mesh, rules: Rules, *, self_condition_prob: float = 0.5,
                    label_dropout: float = 0.1, token_ce: float = 0.0,
                    token_head: dict | None = None,
                    logit_normal: tuple[float, float] | None = None,
                    upper_ce: UpperCE | None = None, upper: dict | None = None):
  """A callable (state, batch [B, n, d], key, labels=None, tokens=None) -> (new state,
  metrics), jitted once; its `flops()` is the step's XLA FLOP count once it has run. With
  token_ce > 0, `token_head` (see `token_loss`) is placed replicated once and every call
  needs the batch's tokens [B, n]; so does `upper_ce` (its arrays `upper`, see `UpperCE`:
  the backbone state kept where it is, the normalizer's arrays replicated). logit_normal:
  see `draw_corruption` (None: uniform training times).

  The first call fixes the state's shardings (`state_shardings`); a state not
  placed there yet (fresh or restored) is moved once (checked on one leaf: a
  per-call device_put of every leaf costs ~25 ms on CPU), the batch every call: `batch` is
  this process's rows of the global batch (all of it with one process). The global B must
  be a multiple of the mesh's batch-axis size. The state passed in is donated:
  don't use it after the call.
  """
  diffusion.validate(diffusion_cfg)
  optimizer = make_optimizer(optim_cfg)
  x_sharding = batch_sharding(mesh, rules, 3)
  replicated = NamedSharding(mesh, PartitionSpec())
  label_sharding = batch_sharding(mesh, rules, 1)
  if token_ce and token_head is None:
    raise ValueError("make_train_step: token_ce > 0 needs the token head")
  head = put_global(dict(token_head), replicated) if token_ce else None
  if upper_ce is not None and upper is None:
    raise ValueError("make_train_step: upper_ce needs the upper layers' arrays")
  upper_shardings = None
  if upper_ce is not None:
    upper_shardings = {"backbone": param_shardings(upper["backbone"], mesh, rules),
                       "norm": jax.tree.map(lambda _: replicated, upper["norm"])}
    upper = put_global(dict(upper), upper_shardings)
  token_sharding = batch_sharding(mesh, rules, 2)
  compiled = {}

  def step(state: TrainState, batch, key, labels=None, tokens=None):
    new = "fn" not in compiled
    if new:
      compiled["fn"], compiled["shardings"] = jit_train_step(
          state, mesh, rules, diffusion_cfg, optimizer, optim_cfg, labels=labels is not None,
          self_condition_prob=self_condition_prob, label_dropout=label_dropout,
          token_ce=token_ce, logit_normal=logit_normal, upper_ce=upper_ce,
          upper_shardings=upper_shardings)
    first = jax.tree.leaves(state.params)[0]
    if getattr(first, "sharding", None) != jax.tree.leaves(compiled["shardings"].params)[0]:
      state = put_global(state, compiled["shardings"])  # ~1,200 leaves: only when needed
    batch = jax.make_array_from_process_local_data(x_sharding, np.asarray(batch))
    key = put_global(key, replicated)
    if labels is not None:
      labels = jax.make_array_from_process_local_data(label_sharding,
                                                      np.asarray(labels, np.int32))
    if token_ce or upper_ce is not None:
      tokens = jax.make_array_from_process_local_data(token_sharding,
                                                      np.asarray(tokens, np.int32))
    else:
      tokens = None
    if new:  # before the call, which donates the state
      compiled["flops"] = lowered_flops(compiled["fn"], state, batch, key, labels, tokens, head,
                                        upper)
    return compiled["fn"](state, batch, key, labels, tokens, head, upper)

  step.flops = lambda: compiled.get("flops")  # the step's FLOPs, known after the first call
  return step
