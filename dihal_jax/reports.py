"""Writing what a command measured: atomic JSON reports and small Markdown tables.

Only process 0 writes (multi-host runs share the workdir).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax


def write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes text via a temporary file + rename (never half-written; process 0 only)."""
  path = Path(path)
  if jax.process_index() != 0:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
  """Saves a matplotlib figure as PNG atomically (process 0 only) and closes it."""
  import matplotlib.pyplot as plt
  path = Path(path)
  try:
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
      with os.fdopen(fd, "wb") as f:
        fig.savefig(f, dpi=dpi, format="png")
      os.replace(tmp, path)
  finally:
    plt.close(fig)
  return path


def write_arrays(path: str | os.PathLike, arrays: dict) -> Path:
  """Saves named arrays as one .npz, atomically (process 0 only)."""
  import numpy as np
  path = Path(path)
  if jax.process_index() != 0:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
  """Writes `obj` as indented JSON, atomically (process 0 only)."""
  return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table; floats in compact scientific/fixed form."""

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e4) and v != 0 else f"{v:.4f}"
    return str(v)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def trim_metrics(path: str | os.PathLike, step: int) -> None:
  """Drops the rows of a metrics.jsonl log past `step` (and a torn last line): a resumed
  run logs those steps again."""
  path = Path(path)
  if not path.exists():
    return

  def logged_step(line: str) -> int | None:
    try:
      return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError):
      return None

  kept = [line for line in path.read_text().splitlines()
          if logged_step(line) is not None and logged_step(line) <= step]
  write_text(path, "".join(line + "\n" for line in kept))


def plot_loss(rows: Sequence[dict], path: str | os.PathLike) -> Path:
  """loss.png of a training log: train loss per step and the validation loss (EMA) points."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
  val = [r for r in rows if "val_loss" in r]
  if val:
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss (EMA)")
  ax.set_xlabel("step")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return save_figure(fig, path)
