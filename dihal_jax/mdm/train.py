"""`dihal mdm`: post-train the whole backbone into a masked diffusion model, resumably.

Flow: the backbone (all weights trainable) -> the mask id (`mask_token_id`) -> seeded,
checkpointable token batches of the train split (grain, data/dataset.py) -> jitted
data-parallel steps on the MDLM loss (mdm/objective.py) with the attention pattern of
mdm/attention.py -> metrics.jsonl (loss, masked-token accuracy, attention rate r),
periodic validation loss, Orbax checkpoints, loss.png.

The optimizer, EMA, train-state layout, sharding and checkpointing are the bridge's
(bridge/train_step.py, bridge/checkpoint.py): AdamW + clipping + warmup-cosine, an
EMA used for sampling, params sharded by their logical axes, the state donated, every
draw from fold_in(key, step), kill -9 / SIGTERM resume to the same next batch.

Budget: mdm.steps = -1 matches the bridge's training tokens (train.steps x
train.batch_size windows), the comparison `dihal eval`'s `mdm` row makes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dihal_jax.backbone import checkpoint as backbone_checkpoint
from dihal_jax.backbone.model import Decoder
from dihal_jax.bridge.checkpoint import read_latest
from dihal_jax.bridge.train_step import (OptimConfig, TrainState, apply_gradients,
                                         init_train_state, lowered_flops, make_optimizer,
                                         state_shardings)
from dihal_jax.bridge.training_loop import Cadence, run_loop
from dihal_jax.data.dataset import Data
from dihal_jax.errors import UserInputError
from dihal_jax.mdm.attention import anneal_rate, annealed_pattern
from dihal_jax.mdm.objective import T_EPS, mask_tokens, mdlm_loss, predictions
from dihal_jax.parallel.sharding import batch_sharding, mesh_and_rules, put_global

# The config sections that shape the trained state (a resume checks them), and the fields
# in them that may change on resume: the run's length and its logging / saving cadence.
STATE_SECTIONS = ("seed", "model", "data", "mdm")
RESUMABLE_CHANGES = ("mdm.steps", "mdm.log_every", "mdm.val_every", "mdm.checkpoint_every",
                     "mdm.max_to_keep", "data.cache_dir", "data.read_threads")
MISSING = "masked diffusion checkpoints (run `dihal mdm` first)"


def mask_token_id(spec: int, tokenizer, vocab_size: int, separator: int) -> int:
  """The absorbing state's token id: an existing row of the embedding (none is added, so
  the LM head keeps its shape).

  spec >= 0: that id. spec = -1, the first that exists of: the tokenizer's
  `mask_token_id`; its highest-id *special* added token that plays no role (not
  BOS/EOS/PAD/UNK, not the separator: SmolLM2's `<empty_output>`, Llama-3's last reserved
  token); the first embedding row past the tokenizer's vocabulary (padding rows, as in
  Qwen3 and the tiny presets).
  """
  if spec == -1:
    roles = set(tokenizer.all_special_ids) | {separator}
    free = [i for i, tok in tokenizer.added_tokens_decoder.items()
            if tok.special and i not in roles and i < vocab_size]
    if tokenizer.mask_token_id is not None:
      spec = int(tokenizer.mask_token_id)
    elif free:
      spec = max(free)
    elif len(tokenizer) < vocab_size:
      spec = len(tokenizer)
    else:
      raise UserInputError("--config.mdm.mask_id=-1: the tokenizer has no mask token, no "
                           "unused special token and no spare embedding row; give one with "
                           "--config.mdm.mask_id=N")
  if not 0 <= spec < vocab_size:
    raise UserInputError(f"--config.mdm.mask_id={spec}: expected -1 (auto) or an id in "
                         f"0..{vocab_size - 1}")
  if spec == separator:
    raise UserInputError(f"--config.mdm.mask_id={spec}: that is the document separator, "
                         "which every window starts with; pick another id")
  return spec


def check(m: ml_collections.ConfigDict, window: int) -> None:
  """One `dihal: error:` line for a bad mdm section (windows of `window` tokens)."""
  if m.anneal_steps < 0:
    raise UserInputError(f"--config.mdm.anneal_steps={m.anneal_steps}: expected >= 0 (0 = "
                         "bidirectional from the first step)")
  if m.block < 0 or (m.block and window % m.block):
    raise UserInputError(f"--config.mdm.block={m.block}: must be 0 (one bidirectional window) "
                         f"or divide the window length {window}")
  if m.block and m.anneal_steps:
    raise UserInputError(f"--config.mdm.block={m.block} with --config.mdm.anneal_steps="
                         f"{m.anneal_steps}: block diffusion has its own pattern; set "
                         "anneal_steps=0")
  if m.steps < -1 or m.steps == 0:
    raise UserInputError(f"--config.mdm.steps={m.steps}: expected >= 1, or -1 (the bridge's "
                         "budget)")
  if m.batch_size < 1 or m.lr <= 0:
    raise UserInputError(f"--config.mdm.batch_size={m.batch_size}, --config.mdm.lr={m.lr}: "
                         "expected > 0")
  if m.mask_id < -1:
    raise UserInputError(f"--config.mdm.mask_id={m.mask_id}: expected -1 (auto) or a token id")
  if min(m.checkpoint_every, m.log_every, m.val_every, m.max_to_keep) < 1:
    raise UserInputError("--config.mdm.checkpoint_every, log_every, val_every, max_to_keep: "
                         "expected >= 1")


def total_steps(config: ml_collections.ConfigDict) -> int:
  """mdm.steps, or (-1) the steps that see the bridge's number of training windows."""
  m = config.mdm
  if m.steps != -1:
    return int(m.steps)
  return max(1, round(config.train.steps * config.train.batch_size / m.batch_size))


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
  m = config.mdm
  return OptimConfig(lr=m.lr, warmup_steps=m.warmup_steps, total_steps=total_steps(config),
                     weight_decay=m.weight_decay, clip_norm=m.clip_norm, ema_decay=m.ema_decay)


def train_step(state: TrainState, tokens: jax.Array, key: jax.Array, *, mask_id: int,
               shift: bool, anneal_steps: int, block: int,
               optimizer: optax.GradientTransformation,
               optim_cfg: OptimConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on the MDLM loss of a token batch [B, T] (un-jitted); block > 0 trains
  block diffusion (mdm/objective.py::predictions).

  Draws (from fold_in(key, step)): t ~ U(T_EPS, 1) per window, the masked positions, and
  while annealing the Bernoulli(r) extra attention edges.
  """
  b, n = tokens.shape
  k_t, k_mask, k_attn = jax.random.split(jax.random.fold_in(key, state.step), 3)
  t = jax.random.uniform(k_t, (b,), jnp.float32, T_EPS, 1.0)
  z, masked = mask_tokens(k_mask, tokens, t, mask_id)
  rate = anneal_rate(state.step, anneal_steps)
  pattern = annealed_pattern(k_attn, b, n, rate) if anneal_steps > 0 else None

  def loss_fn(params):
    model = nnx.merge(state.graphdef, params, state.rest)
    logits = predictions(model, z, tokens, shift=shift, block=block, attention=pattern)
    loss = mdlm_loss(logits, tokens, masked, t)
    hits = jnp.argmax(logits, axis=-1) == tokens
    accuracy = jnp.sum(hits & masked) / jnp.maximum(jnp.sum(masked), 1)
    return loss, accuracy

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return apply_gradients(state, grads, optimizer, optim_cfg), {"loss": loss, "masked_accuracy": accuracy,
                     "grad_norm": optax.tree.norm(grads), "attention_rate": rate}


def make_train_step(mesh: jax.sharding.Mesh, rules, optim_cfg: OptimConfig, *, mask_id: int,
                    shift: bool, anneal_steps: int, block: int = 0):
  """(state, tokens [B, T] this process's rows, key) -> (new state, metrics), jitted once with
  the bridge's state shardings; the state is donated. Its `flops()` is the step's XLA FLOP
  count once it has run."""
  optimizer = make_optimizer(optim_cfg)
  fn = functools.partial(train_step, mask_id=mask_id, shift=shift, anneal_steps=anneal_steps,
                         block=block, optimizer=optimizer, optim_cfg=optim_cfg)
  token_sharding = batch_sharding(mesh, rules, 2)
  replicated = NamedSharding(mesh, PartitionSpec())
  compiled = {}

  def step(state: TrainState, tokens, key):
    new = "fn" not in compiled
    if new:
      shardings = compiled["shardings"] = state_shardings(state, mesh, rules, optimizer)
      compiled["fn"] = jax.jit(fn, in_shardings=(shardings, token_sharding, replicated),
                               out_shardings=(shardings, replicated), donate_argnums=(0,))
    first = jax.tree.leaves(state.params)[0]
    if getattr(first, "sharding", None) != jax.tree.leaves(compiled["shardings"].params)[0]:
      state = put_global(state, compiled["shardings"])
    tokens = jax.make_array_from_process_local_data(token_sharding, np.asarray(tokens, np.int32))
    key = put_global(key, replicated)
    if new:  # before the call, which donates the state
      compiled["flops"] = lowered_flops(compiled["fn"], state, tokens, key)
    return compiled["fn"](state, tokens, key)

  step.flops = lambda: compiled.get("flops")
  return step


def _val_loss_fn(graphdef, key, mask_id: int, shift: bool, block: int):
  """MDLM loss of the EMA params on a fixed batch with fixed draws, the trained pattern
  (bidirectional, or block diffusion)."""

  @jax.jit
  def val_loss(ema, rest, tokens):
    model = nnx.merge(graphdef, ema, rest)
    k_t, k_mask = jax.random.split(key)
    t = jax.random.uniform(k_t, (tokens.shape[0],), jnp.float32, T_EPS, 1.0)
    z, masked = mask_tokens(k_mask, tokens, t, mask_id)
    return mdlm_loss(predictions(model, z, tokens, shift=shift, block=block), tokens, masked, t)

  return val_loss


def run_mdm(config: ml_collections.ConfigDict, workdir: str | Path, *,
            progress: bool = True) -> dict:
  """Trains (or resumes, or extends) the MDM of `workdir`; returns the run's report."""
  workdir = Path(workdir)
  m = config.mdm
  t0 = time.perf_counter()
  check(m, config.data.window)
  steps = total_steps(config)
  data = Data.from_config(config, workdir)
  ckpt_dir = backbone_checkpoint.checkpoint_dir(config, workdir)
  backbone = backbone_checkpoint.load_backbone(config, ckpt_dir)
  mask_id = mask_token_id(m.mask_id, data.tokenizer, backbone.cfg.vocab_size, data.separator)
  mesh, rules = mesh_and_rules(config)
  optim_cfg = optim_config(config)
  state = init_train_state(backbone, make_optimizer(optim_cfg))
  del backbone
  step_fn = make_train_step(mesh, rules, optim_cfg, mask_id=mask_id, shift=m.shift,
                            anneal_steps=m.anneal_steps, block=m.block)
  batches = iter(data.windows("train", batch_size=m.batch_size))
  replicated = NamedSharding(mesh, PartitionSpec())
  val_tokens = put_global(data.first_windows("validation", m.batch_size), replicated)
  val_loss_fn = _val_loss_fn(state.graphdef, jax.random.key(config.seed + 1), mask_id, m.shift,
                             m.block)
  key = jax.random.key(config.seed)
  setup_s = time.perf_counter() - t0

  def step(state, batch):
    tokens = batch["tokens"]
    state, metrics = step_fn(state, tokens, key)
    return state, metrics, tokens.shape[0] * tokens.shape[1]

  result = run_loop(
      state, workdir=workdir, batches=batches, step=step,
      validate=lambda state: val_loss_fn(state.ema, state.rest, val_tokens),
      optim_cfg=optim_cfg,
      cadence=Cadence(steps, m.log_every, m.val_every, m.checkpoint_every, m.max_to_keep),
      checkpoint_config=config.to_dict(), sections=STATE_SECTIONS,
      resumable_changes=RESUMABLE_CHANGES,
      extra={"mask_id": mask_id, "shift": bool(m.shift), "window": config.data.window,
             "block": int(m.block)},
      desc="mdm", flops=step_fn.flops, progress=progress)
  return {"steps": result.done, "total_steps": steps, "start_step": result.start,
          "mask_id": mask_id, "mask_token": data.tokenizer.convert_ids_to_tokens(mask_id),
          "shift": bool(m.shift), "anneal_steps": int(m.anneal_steps), "block": int(m.block),
          "tokens_seen": result.done * m.batch_size * config.data.window,
          "final": result.rows[-1] if result.rows else None,
          "interrupted": result.interrupted,
          "timings": {"setup_s": setup_s, "total_s": time.perf_counter() - t0}}


@dataclasses.dataclass
class TrainedMDM:
  """A post-trained MDM for sampling: the Decoder with its EMA params."""

  model: Decoder
  mask_id: int
  shift: bool
  step: int
  block: int  # > 0: trained as block diffusion with blocks of this many positions


def load_mdm(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainedMDM:
  """The newest checkpoint of `dihal mdm --workdir=workdir` (EMA params). The architecture
  comes from `config` (its model section must be the run's; the restore checks shapes)."""
  ckpt = Path(workdir) / "checkpoints"
  holder = {}

  def abstract(stored: dict, extra: dict):
    if "mask_id" not in extra:
      raise UserInputError(f"{workdir}: its checkpoints are not a masked diffusion model "
                           "(a bridge run?); give the workdir of `dihal mdm`")
    arch, optim = backbone_checkpoint.backbone_config(config), optim_config(
        ml_collections.ConfigDict(stored))
    state = holder["state"] = jax.eval_shape(lambda: init_train_state(
        Decoder(arch, attention=config.model.attention, rngs=nnx.Rngs(0)),
        make_optimizer(optim)))
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())

  step, restored, extra, _ = read_latest(ckpt, abstract, what=MISSING)
  model = nnx.merge(holder["state"].graphdef, restored["ema"], restored["rest"])
  return TrainedMDM(model=model, mask_id=int(extra["mask_id"]), shift=bool(extra["shift"]),
                    step=int(step), block=int(extra.get("block", 0)))
