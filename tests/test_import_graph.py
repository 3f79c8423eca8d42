"""The package's import direction: a module imports only from its own layer or the layers below.

Layers, bottom to top (docs/design.md states the same order):

  errors, files, reports, overrides, assets -> parallel -> backbone -> data -> geometry -> bridge
  -> hybrid -> mdm -> eval -> analysis -> planning -> settings, defaults, demo, cli

Every module under dihal_jax/ is parsed with `ast` (function-level imports included) and each
`dihal_jax.*` import is mapped to the layer of its top-level package or module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dihal_jax

LAYERS = (
    ("__init__", "errors", "files", "reports", "overrides", "assets"),
    ("parallel",),
    ("backbone",),
    ("data",),
    ("geometry",),
    ("bridge",),
    ("hybrid",),
    ("mdm",),
    ("eval",),
    ("analysis", "dglm"),
    ("planning",),
    ("settings", "defaults", "demo", "cli"),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
ROOT = Path(dihal_jax.__file__).parent


def _unit(module: str) -> str:
  """dihal_jax.bridge.train -> "bridge"; dihal_jax -> "__init__"."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
  """Every dihal_jax module `source` (the text of `module`) imports, lazily or not."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split(".")[0] == "dihal_jax")
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against the importing package
        package = module.split(".")
        package = package if is_package else package[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
      if base.split(".")[0] != "dihal_jax":
        continue
      if base == "dihal_jax":  # from dihal_jax import reports, settings
        out.update(f"dihal_jax.{a.name}" for a in node.names)
      else:
        out.add(base)
  return out


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
  """`a (layer i) -> b (layer j)` for every import of a higher layer, and every module whose
  top-level name has no layer; `modules`: name -> (source, is_package)."""
  bad = []
  for module, (source, is_package) in sorted(modules.items()):
    unit = _unit(module)
    if unit not in LAYER:
      bad.append(f"{module}: {unit!r} has no layer in LAYERS")
      continue
    for target in sorted(imported_modules(source, module, is_package)):
      other = _unit(target)
      if other not in LAYER:
        bad.append(f"{module} -> {target}: {other!r} has no layer in LAYERS")
      elif LAYER[other] > LAYER[unit]:
        bad.append(f"{module} ({unit}, layer {LAYER[unit]}) -> {target} ({other}, layer "
                   f"{LAYER[other]})")
  return bad


def package_modules() -> dict[str, tuple[str, bool]]:
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    name = ".".join(parts[:-1] if is_package else parts)
    out[name] = (path.read_text(encoding="utf-8"), is_package)
  return out


def test_no_module_imports_a_higher_layer():
  modules = package_modules()
  assert len(modules) > 40  # the walk found the package
  bad = violations(modules)
  print("\n".join(bad))
  assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_parallel_imports_no_model_code():
  modules = package_modules()
  for name, (source, is_package) in modules.items():
    if name.startswith("dihal_jax.parallel"):
      assert all(_unit(t) in ("__init__", "errors", "files", "reports", "parallel")
                 for t in imported_modules(source, name, is_package)), name


@pytest.mark.parametrize("module, source, is_package, expected", [
    # a lazy import inside a function counts
    ("dihal_jax.parallel.x", "def f():\n  from dihal_jax.bridge import train\n", False,
     ["dihal_jax.parallel.x (parallel, layer 1) -> dihal_jax.bridge (bridge, layer 5)"]),
    ("dihal_jax.data.x", "import dihal_jax.eval.metrics\n", False,
     ["dihal_jax.data.x (data, layer 3) -> dihal_jax.eval.metrics (eval, layer 8)"]),
    ("dihal_jax.eval.x", "from dihal_jax import reports, settings\n", False,
     ["dihal_jax.eval.x (eval, layer 8) -> dihal_jax.settings (settings, layer 11)"]),
    # relative imports resolve against the importing package
    ("dihal_jax.backbone.x", "from ..hybrid import sample\n", False,
     ["dihal_jax.backbone.x (backbone, layer 2) -> dihal_jax.hybrid (hybrid, layer 6)"]),
    ("dihal_jax.parallel", "from .topology import GIB\nfrom ..planning import plan\n", True,
     ["dihal_jax.parallel (parallel, layer 1) -> dihal_jax.planning (planning, layer 10)"]),
    ("dihal_jax.newpkg.x", "", False, ["dihal_jax.newpkg.x: 'newpkg' has no layer in LAYERS"]),
    # allowed: the same layer, a lower one, other packages
    ("dihal_jax.cli", "from dihal_jax import demo, settings\nfrom dihal_jax.eval import sweep\n"
     "import numpy\n", False, []),
    ("dihal_jax.bridge.x", "from dihal_jax.bridge import diffusion\n"
     "from dihal_jax.parallel.sharding import make_mesh\nfrom dihal_jax import errors\n", False,
     []),
])
def test_violations_are_found(module, source, is_package, expected):
  assert violations({module: (source, is_package)}) == expected
