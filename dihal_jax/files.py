"""Publishing a directory built under a temporary name: complete or absent, never half-written.

Several processes (a multi-host job on a shared disk) may build the same
deterministic directory at once; the first rename wins and the others keep it.
"""

from __future__ import annotations

import os
from pathlib import Path


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, marker: str) -> Path:
  """Renames tmp -> final; if another process published `final` (with its `marker` file)
  first, keeps that one (the caller removes tmp)."""
  final = Path(final)
  try:
    os.rename(tmp, final)
  except OSError:
    if not (final / marker).is_file():
      raise
  return final
