"""The loop every trainer runs (`dihal train`, `dihal mdm`): resume, step, log, validate,
checkpoint, stop.

Resume: the latest readable checkpoint (the state's `checkpoint_items()`, its step and the
batch iterator's position) replaces the fresh state; metrics.jsonl loses rows past it.
Each step appends {"step", the step's metrics, "lr", "step_time_s", "tokens_per_s" and,
where the step's program has an XLA FLOP count, "tflop_per_s"} every `log_every` steps,
plus "val_loss" every `val_every` steps and at the end. The same rows go to a TensorBoard
event file beside metrics.jsonl (`ScalarEvents`, process 0), flushed at each
checkpoint and at the end; each run writes a new file that hides the older files' steps past
its start, as metrics.jsonl drops its rows. SIGTERM finishes the step, saves and returns
(`interrupted`). A non-finite loss raises `TrainingStopped` naming the step; the last good
checkpoint stays. At the end: loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar
from tqdm import tqdm

from dihal_jax import reports
from dihal_jax.bridge.checkpoint import BridgeCheckpointer
from dihal_jax.bridge.train_step import OptimConfig, TrainState, learning_rate


class TrainingStopped(Exception):
  """A non-finite loss: training stops, the last good checkpoint stays."""


class TrainingInterrupted(Exception):
  """SIGTERM stopped a stage of a pipeline (saved): what follows it must not run on the
  half-trained model; the same command resumes."""


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How long to train and how often to log, validate and save."""

  steps: int
  log_every: int
  val_every: int
  checkpoint_every: int
  max_to_keep: int


class ScalarEvents:
  """A TensorBoard event file of scalars in `directory`, written synchronously (tensorboardX's
  record writer, not `SummaryWriter`'s queue thread): what `flush` returns after is on disk.

  TensorBoard reads a directory's event files in name order; the SessionLog START written
  first hides the older files' events at steps >= `first_step`.
  """

  def __init__(self, directory: Path, first_step: int):
    self._writer = EventsWriter(str(directory / "events"))
    self._writer.write_event(Event(wall_time=time.time(), step=first_step,
                                   session_log=SessionLog(status=SessionLog.START)))

  def add(self, row: dict) -> None:
    """Each field of a metrics.jsonl row but "step", a scalar tagged with its name."""
    for name, value in row.items():
      if name != "step":
        self._writer.write_event(Event(wall_time=time.time(), step=row["step"],
                                       summary=scalar(name, value)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  start: int  # the step the run resumed from (0 = fresh)
  done: int  # the last step taken
  rows: list[dict]  # every metrics.jsonl row
  interrupted: bool  # stopped by SIGTERM

  def finished(self, what: str) -> "LoopResult":
    """self, or TrainingInterrupted(what) when SIGTERM stopped the loop: for pipelines whose
    next stage would use the model."""
    if self.interrupted:
      raise TrainingInterrupted(what)
    return self


def run_loop(state: TrainState, *, workdir: Path, batches: Iterator,
             step: Callable[[TrainState, Any], tuple[TrainState, dict, int]],
             validate: Callable[[TrainState], Any], optim_cfg: OptimConfig, cadence: Cadence,
             checkpoint_config: dict, sections: tuple[str, ...],
             resumable_changes: tuple[str, ...], extra: dict, desc: str,
             flops: Callable[[], float | None] = lambda: None,
             progress: bool = True) -> LoopResult:
  """Trains `state` to `cadence.steps` in `workdir` (checkpoints/, metrics.jsonl, loss.png).

  `step(state, batch) -> (state, metrics {name: scalar, "loss" among them}, tokens in the
  batch)`; `validate(state) -> loss`. `checkpoint_config`, `sections`, `resumable_changes`:
  what a resume checks (bridge/checkpoint.py); `extra`: JSON saved beside each checkpoint.
  `flops() -> the step's FLOPs` (None: unknown) gives the achieved TFLOP/s of each step.
  """
  checkpointer = BridgeCheckpointer(workdir / "checkpoints", save_every=cadence.checkpoint_every,
                                    max_to_keep=cadence.max_to_keep, config=checkpoint_config,
                                    ignore_fields=resumable_changes, sections=sections)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())
  restored = checkpointer.restore_latest(abstract, batches)
  start = 0
  if restored is not None:
    start, saved, _ = restored
    state = state.replace(**saved)
    print(f"resumed from step {start}")
  metrics_path = workdir / "metrics.jsonl"
  reports.trim_metrics(metrics_path, start)
  events = ScalarEvents(workdir, start + 1) if jax.process_index() == 0 else None
  stop = {"sigterm": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  done, last = start, cadence.steps
  try:
    with open(metrics_path if jax.process_index() == 0 else os.devnull, "a") as log:
      bar = tqdm(range(start, last), initial=start, total=last, desc=desc, disable=not progress)
      for index in bar:
        tick = time.perf_counter()
        state, metrics, tokens = step(state, next(batches))
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          raise TrainingStopped(f"non-finite loss {loss} at step {index + 1}; the last good "
                                f"checkpoint (step {max(checkpointer.all_steps(), default=0)}) "
                                "is kept")
        done = index + 1
        seconds = time.perf_counter() - tick
        row = {"step": done, **{k: float(v) for k, v in metrics.items()},
               "lr": float(learning_rate(optim_cfg, done)), "step_time_s": seconds,
               "tokens_per_s": tokens / seconds}
        step_flops = flops()
        if step_flops is not None:
          row["tflop_per_s"] = step_flops / seconds / 1e12
        if done % cadence.val_every == 0 or done == last:
          row["val_loss"] = float(validate(state))
        if done % cadence.log_every == 0 or "val_loss" in row or done == last:
          log.write(json.dumps(row) + "\n")
          log.flush()
          if events is not None:
            events.add(row)
          bar.set_postfix(loss=f"{loss:.4f}")
        saved = checkpointer.save(done, state.checkpoint_items(), batches, extra,
                                  force=stop["sigterm"] or done == last)
        if saved and events is not None:
          events.flush()
        if stop["sigterm"]:
          print(f"SIGTERM: saved step {done}, exiting")
          break
  finally:
    signal.signal(signal.SIGTERM, previous)
    checkpointer.close()
    if events is not None:
      events.close()
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
  reports.plot_loss(rows, workdir / "loss.png")
  return LoopResult(state, start, done, rows, stop["sigterm"])
