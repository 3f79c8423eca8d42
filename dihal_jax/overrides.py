"""The one way a config is changed after it is loaded: `overridden(config, {"a.b": value})`.

A resolved copy, locked, then `ConfigDict.update_from_flattened_dict`: a path that names no
existing field raises KeyError (the lock refuses new fields, so a typo cannot add one), and a
value of another type raises TypeError (ml_collections' own type check). The demo presets,
the sweep's and the ablation's per-run changes, eval's l = 0 bridge and the CLI's `sample`
flags all go through it.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def overridden(config: ml_collections.ConfigDict,
               updates: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with `updates` ({"section.field": value}) applied; KeyError on a path
  of no field. The copy is locked; `config` is unchanged."""
  copy = config.copy_and_resolve_references()
  copy.lock()
  copy.update_from_flattened_dict(dict(updates))
  return copy
