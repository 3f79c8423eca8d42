"""Saving and resuming a bridge training run: model state, data position, config.

What: `BridgeCheckpointer` wraps an Orbax `CheckpointManager`. Each checkpoint
step `<directory>/<step>/` holds four items:

  state/      the training-state pytree (params, EMA, optimizer state, step, RNG
              key data; jax or numpy arrays), Orbax `StandardSave` (OCDBT/zarr)
  data_iter/  the grain iterator's position, one JSON file per process
  extra/      a small JSON dict (normalization statistics as lists, ...)
  config/     the training config (a plain JSON-able dict) the step was written with

Why: a preempted run resumes bit-identically (same weights, same next batch),
and a run restarted with a different model or data config fails loudly instead
of silently loading weights it was not configured for. Only the fields named in
`ignore_fields` (default: `train.steps`, so a run may be extended) may differ;
`sections` limits the comparison to the config sections that shape the
trained state (`dihal train` passes model, data, bridge, train and seed, so
sampling, evaluation or planning settings, or a field added to them later,
never block a resume).
A latest step that cannot be read (truncated or deleted files) is skipped with
a warning, renamed to `<step>.unreadable` (so the resumed run can save that
step again), and the step before it is used.

Usage:

  ckpt = BridgeCheckpointer(workdir / "checkpoints", save_every=1000,
                            max_to_keep=3, config=config_dict)
  resumed = ckpt.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                                data_iter)
  if resumed is not None:
    step, state, extra = resumed
  for step in range(step + 1, total + 1):
    ...
    ckpt.save(step, state, data_iter, {"mean": mean.tolist()})  # no-op off the interval
  ckpt.save(total, state, data_iter, extra, force=True)
  ckpt.close()  # waits for the last asynchronous save

Saves are asynchronous: `save` returns once the arrays are copied off the
device, the files are written in the background, and `wait()` (or `close()`)
must be called before the process exits. Multi-host: every process calls every
method with the same arguments; Orbax coordinates the processes (each writes
its own shards and its own data-iterator file, the primary one commits the step).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import grain
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from dihal_jax.backbone import lora
from dihal_jax.errors import UserInputError

log = logging.getLogger(__name__)

_ABSENT = "<absent>"
# Config fields added after checkpoints were first written, with the value a checkpoint that
# predates a field ran at (its default, the old behaviour): such a checkpoint still resumes
# when the run keeps that value.
FIELDS_ADDED = {"train.time_sampling": "uniform", "train.logit_normal": [0.0, 1.0],
                "bridge.dtype": "float32", "mdm.block": 0, "dglm.lora_rank": 0,
                "dglm.lora_alpha": 16.0, "dglm.lora_targets": lora.ALL, "train.upper_ce": 0.0,
                "train.upper_ce_windows": 2}


def stored_config(stored: dict) -> ml_collections.ConfigDict:
  """A checkpoint's config, with each FIELDS_ADDED field it predates at the value it ran at:
  for building the model a checkpoint describes."""
  config = ml_collections.ConfigDict(stored)
  for path, value in FIELDS_ADDED.items():
    section, name = path.split(".")
    if section in config and name not in config[section]:
      config[section][name] = value
  return config


def _json_normal(obj: Any) -> Any:
  """What `obj` becomes after a JSON round trip (tuples -> lists, int keys -> str)."""
  return json.loads(json.dumps(obj))


def _flatten(obj: dict) -> dict[str, Any]:
  """Nested dicts -> {"a.b.c": leaf}; lists, scalars and empty dicts are leaves."""
  flat = traverse_util.flatten_dict(obj, keep_empty_nodes=True, sep=".")
  return {k: {} if v is traverse_util.empty_node else v for k, v in flat.items()}


def _ignored(path: str, ignore_fields: Sequence[str]) -> bool:
  return any(path == f or path.startswith(f + ".") for f in ignore_fields)


def first_config_difference(stored: dict, current: dict, ignore_fields: Sequence[str] = (),
                            sections: Sequence[str] | None = None
                            ) -> tuple[str, Any, Any] | None:
  """(dotted field path, stored value, current value) of the first difference, or None.

  Only fields under `sections` (all when None) count, minus `ignore_fields`. A field of
  FIELDS_ADDED that `stored` lacks holds the value it ran at.
  """
  a, b = _flatten(_json_normal(stored)), _flatten(_json_normal(current))
  a = {**{k: v for k, v in FIELDS_ADDED.items() if k in b}, **a}
  for path in sorted(set(a) | set(b)):
    if _ignored(path, ignore_fields) or (
        sections is not None and not _ignored(path, sections)):
      continue
    va, vb = a.get(path, _ABSENT), b.get(path, _ABSENT)
    if va != vb or type(va) is not type(vb) and not {type(va), type(vb)} <= {int, float}:
      return path, va, vb
  return None


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"


class BridgeCheckpointer:
  """Periodic asynchronous checkpoints of (state, data iterator, extra, config)."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int, max_to_keep: int,
               config: dict, ignore_fields: Sequence[str] = ("train.steps",),
               sections: Sequence[str] | None = None):
    if save_every < 1:
      raise UserInputError(f"checkpoint save_every must be >= 1, got {save_every}")
    if max_to_keep < 1:
      raise UserInputError(f"checkpoint max_to_keep must be >= 1, got {max_to_keep}")
    # Orbax's tensorstore backend needs absolute local paths ("runs/x" fails mid-save).
    self.directory = epath.Path(directory if "://" in str(directory)
                                else os.path.abspath(directory))
    self.save_every = save_every
    self.config = _json_normal(config)  # fails here (TypeError) if not JSON-able
    self.ignore_fields = tuple(ignore_fields)
    self.sections = None if sections is None else tuple(sections)
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserInputError(
          f"checkpoint directory {self.directory} cannot be created: {_first_line(e)}") from e
    if not self.directory.is_dir() or (
        "://" not in str(self.directory) and not os.access(self.directory, os.W_OK | os.X_OK)):
      raise UserInputError(f"checkpoint directory {self.directory} is not a writable directory")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=save_every,
                                             max_to_keep=max_to_keep,
                                             enable_async_checkpointing=True))

  def all_steps(self) -> list[int]:
    """The committed steps on disk, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iter, extra: dict, *, force: bool = False) -> bool:
    """Starts saving `step` if it is on the interval (or `force`); True if it did.

    Returns as soon as the arrays are copied; the write finishes in the background.
    Steps at or below the newest step on disk are never saved (Orbax's rule).
    """
    if not force and step % self.save_every:  # Orbax alone would also save the first step
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            extra=ocp.args.JsonSave(_json_normal(extra)),
            config=ocp.args.JsonSave(self.config)),
        force=force)

  def _check_config(self, step: int) -> None:
    stored = self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    diff = first_config_difference(stored, self.config, self.ignore_fields, self.sections)
    if diff is not None:
      path, was, now = diff
      raise UserInputError(
          f"checkpoint {self.directory / str(step)} was written with {path}={was!r}, "
          f"this run has {path}={now!r} (use a new workdir, or change it back)")

  def restore_latest(self, abstract_state, data_iter) -> tuple[int, Any, dict] | None:
    """(step, state, extra) of the newest readable step, or None when there is none.

    `abstract_state`: `jax.tree.map(ocp.utils.to_shape_dtype_struct, state)` (shapes,
    dtypes and shardings of the restored arrays). `data_iter` is moved, in place, to
    the position it had when the step was saved. A step whose files cannot be read
    is skipped with a warning; a config that differs from this run's raises
    UserInputError (no fallback: every older step was written by the same run).
    """
    self.wait()
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        self._check_config(step)
      except UserInputError:
        raise
      except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable
        errors.append(f"step {step}: {_first_line(e)}")
        log.warning("checkpoint %s: config unreadable (%s); trying the previous step",
                    self.directory / str(step), _first_line(e))
        continue
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_iter=grain.checkpoint.CheckpointRestore(data_iter),
                extra=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001
        errors.append(f"step {step}: {_first_line(e)}")
        log.warning("checkpoint %s is unreadable (%s); trying the previous step",
                    self.directory / str(step), _first_line(e))
        continue
      if errors:
        log.warning("resumed from checkpoint %s, not the latest step %d",
                    self.directory / str(step), steps[0])
        self._move_aside([s for s in steps if s > step])
      return step, restored["state"], restored["extra"]
    raise UserInputError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))

  def _move_aside(self, steps: Sequence[int]) -> None:
    """Renames unreadable steps to `<step>.unreadable[-n]` (kept for inspection).

    Orbax never saves a step at or below the newest one on disk, so leaving them
    in place would silently skip the next saves of the resumed run.
    """
    if ocp.multihost.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        dst, n = self.directory / f"{step}.unreadable", 0
        while dst.exists():
          n += 1
          dst = self.directory / f"{step}.unreadable-{n}"
        src.rename(dst)
        log.warning("moved unreadable checkpoint %s to %s", src, dst)
    ocp.multihost.sync_global_processes("dihal_bridge_checkpoint_move_aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()


def read_latest(directory: str | os.PathLike, make_abstract_state, *,
                what: str = "bridge checkpoints (run `dihal train` first)"
                ) -> tuple[int, Any, dict, dict]:
  """(step, state, extra, config) of the newest step, for inference (no data iterator).

  `make_abstract_state(config, extra) -> abstract state tree`: the stored config
  and extra come first, so the caller can build the model they describe. `what` names
  the missing thing in the error.
  """
  directory = epath.Path(os.path.abspath(directory))
  if not directory.is_dir():
    raise UserInputError(f"no {what} in {directory}")
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise UserInputError(f"no {what} in {directory}")
    meta = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                         extra=ocp.args.JsonRestore()))
    abstract = make_abstract_state(meta["config"], meta["extra"])
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  finally:
    manager.close()
  return step, state, meta["extra"], meta["config"]
