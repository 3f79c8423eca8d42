"""`dihal COMMAND --config=FILE [--config.a.b=v ...] --workdir=DIR [flags]`.

Thin by design: parse, call one library function, write the report. Bad
input (a `UserInputError`, a flag or config error) ends with one line on
stderr and exit status 2, no traceback.

Commands:
  convert   HF checkpoint -> sharded JAX params -> HF safetensors, checked bit for bit
  parity    JAX vs transformers (fp32): logits, KL, hidden states, greedy generation
  generate  continue --prompt with the backbone (KV cache; greedy, temperature, top-p)
  data      build the corpus splits (tfds, array_record) and count documents/tokens/windows
  locate    geometry proxies per layer, the score and the selected layer l*
  train     train the diffusion bridge at bridge.layer (auto = l*), resumable
  mdm       post-train the backbone into a masked diffusion model (config mdm), resumable
  sample    bridge -> upper layers -> text (readout modes, --prompt, --infill) into samples.jsonl;
            --method=mdm: the masked diffusion model's samples; --method=dglm [--attribute
            NAME=VALUE]: DGLM's continuations of --prompt, steered toward the attribute
  eval      every method and reference row: gen PPL, diversity, memorization, spread, recovery
  sweep     the fixed bridge protocol at each of --layers; Spearman ρ of score vs val loss
  mechanism the AR backbone vs its MDM (mechanism.mdm): CKA, attention, logit lens, patching
  dglm      DGLM on labelled books (config dglm): latent diffusion proposes, soft prompts steer
            the frozen backbone, attribute control measured by an independent judge; resumable
  demo      what exists end to end on the default model (see README)
  plan      --topology=NAME [--out FILE] [--compile]: per-device memory and paper step times
            of the config on a TPU/GPU topology, nothing allocated (no --workdir)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from dihal_jax.errors import UserInputError
from dihal_jax.parallel import distributed

COMMANDS = ("convert", "parity", "generate", "data", "locate", "train", "mdm", "sample", "eval",
            "sweep", "ablate", "mechanism", "dglm", "demo", "plan")
# `plan --compile` compiles for 8 devices on the host's CPU: the flag must precede JAX's start.
COMPILE_XLA_FLAG = "--xla_force_host_platform_device_count=8"

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                flag_values=FLAGS, lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for reports, plots and outputs.",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", [], "generate: prompt text (repeatable).", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 32, "generate: tokens per prompt.", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "generate: 0 = greedy.", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "generate: nucleus mass.", flag_values=FLAGS)
flags.DEFINE_integer("num", None, "sample: number of samples (config sample.num).",
                     flag_values=FLAGS)
flags.DEFINE_integer("length", None, "sample: positions per sample (config sample.length).",
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "sample: bridge sampler steps (config sample.steps).",
                     flag_values=FLAGS)
flags.DEFINE_string("readout", None, "sample: blockwise | lm_head | refine | identity | joint "
                    "(config sample.readout).", flag_values=FLAGS)
flags.DEFINE_string("method", None, "sample: bridge | mdm | dglm (config sample.method).",
                    flag_values=FLAGS)
flags.DEFINE_string("attribute", None, "sample --method=dglm: NAME=VALUE[+NAME=VALUE] to steer "
                    "toward (config sample.attribute).", flag_values=FLAGS)
flags.DEFINE_string("layers", "", "sweep: layers to train, e.g. 0,1,2 or 1-4.",
                    flag_values=FLAGS)
flags.DEFINE_string("infill", "", "sample: text whose [___] gaps the bridge fills.",
                    flag_values=FLAGS)
flags.DEFINE_string("topology", None, "plan: v5e-8 | v5e-16 | v4-32 | v5p-8 | h100x8 | h100x16.",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "plan: write the plan as JSON to this file.", flag_values=FLAGS)
flags.DEFINE_bool("compile", False, "plan: also compile the programs on 8 simulated CPU devices.",
                  flag_values=FLAGS)


def _fail(message: str) -> int:
  print(f"dihal: error: {message}", file=sys.stderr)
  return 2


def _config_load_error(error: OSError) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"flag --config: cannot load the config file ({lines[-1] if lines else error})"


def _override_error(error: Exception, args: list[str]) -> str:
  """One line naming the --config.* override whose path has no such field; else re-raises."""
  inner = error
  while inner.args and isinstance(inner.args[0], BaseException):
    inner = inner.args[0]
  text = str(inner.args[0]) if inner.args else str(inner)
  first, _, hint = text.partition("\n")
  field = first.strip().strip("'\"")
  names = [a.split("=", 1)[0] for a in args if a.startswith("--config.")]
  culprit = next((n for n in names if field in n[len("--config."):].split(".")), None)
  if culprit is None:  # not an override typo (e.g. a bug inside the config file)
    raise error
  hint = " ".join(hint.split())
  return f"flag {culprit}: the config has no field {field!r}" + (f" ({hint})" if hint else "")


def _log_environment():
  import jax
  print(f"jax {jax.__version__}, process {jax.process_index()}/{jax.process_count()}, "
        f"devices {jax.devices()}", file=sys.stderr)


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    return _fail(f"expected a command, one of {', '.join(COMMANDS)} (usage: dihal COMMAND "
                 "--config=FILE --workdir=DIR)")
  command = argv[1]
  if command == "plan" and any(a.startswith("--compile") for a in argv[2:]):
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla_flags:
      os.environ["XLA_FLAGS"] = f"{xla_flags} {COMPILE_XLA_FLAG}".strip()
  overrides = [a for a in argv[2:] if a.startswith("--config.")]
  if overrides and not any(a == "--config" or a.startswith("--config=") for a in argv[2:]):
    return _fail(f"{overrides[0].split('=', 1)[0]}: pass --config=FILE before the --config.* "
                 "overrides (e.g. --config=configs/smollm2_135m.py)")
  try:
    FLAGS([argv[0]] + argv[2:])
  except flags.Error as e:
    return _fail(str(e).splitlines()[0])
  except OSError as e:  # ml_collections: a config file that cannot be loaded, with overrides
    return _fail(_config_load_error(e))
  except (AttributeError, KeyError) as e:  # ml_collections: --config.a.b override of no field
    return _fail(_override_error(e, argv[2:]))
  except ValueError as e:  # ml_collections: an override path it cannot parse (--config.a-b=1)
    return _fail(str(e).splitlines()[0])
  if FLAGS.config is None:
    return _fail("--config=FILE is required (e.g. --config=configs/smollm2_135m.py)")
  try:
    FLAGS.config.keys()  # ml_collections defers a config-file load error to first access
  except OSError as e:
    return _fail(_config_load_error(e))
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
  if command != "demo":  # the demo checks its effective config, after its preset
    from dihal_jax import settings
    try:
      settings.check(FLAGS.config, command)
    except UserInputError as e:
      return _fail(str(e))
  if command == "plan":
    try:
      return _plan(FLAGS.config, config_flags.get_config_filename(FLAGS["config"]))
    except UserInputError as e:
      return _fail(str(e))
  if not FLAGS.workdir:
    return _fail("--workdir=DIR is required")
  workdir = Path(FLAGS.workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_test"
    probe.touch()
    probe.unlink()
  except OSError as e:
    return _fail(f"--workdir={workdir}: not writable ({e.strerror})")
  try:
    distributed.initialize()
    _log_environment()
    return _run(command, FLAGS.config, workdir)
  except UserInputError as e:
    return _fail(str(e))


def _writable_file(path: Path) -> Path:
  """`path` if a file can be written there (parents made), else a UserInputError."""
  if path.is_dir():
    raise UserInputError(f"--out={path}: is a directory, expected a file name")
  blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
  if blocker is not None:
    raise UserInputError(f"--out={path}: {blocker} is not a directory")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.parent / f".{path.name}.write_test"
    probe.touch()
    probe.unlink()
  except OSError as e:
    raise UserInputError(f"--out={path}: cannot write there ({e.strerror})") from None
  return path


def _plan(config, config_name: str) -> int:
  """`dihal plan`: needs --topology, no --workdir; prints the plan, --out writes its JSON."""
  from dihal_jax import reports
  from dihal_jax.parallel import topology
  from dihal_jax.planning import plan

  if not FLAGS.topology:
    return _fail(f"plan: --topology=NAME is required (one of {', '.join(topology.TOPOLOGIES)})")
  target = topology.get_topology(FLAGS.topology)
  out = _writable_file(Path(FLAGS.out)) if FLAGS.out else None
  if FLAGS.compile:
    _log_environment()
  report = plan.make_plan(config, target, config_name=config_name, compile=FLAGS.compile)
  print(plan.summary(report, config))
  if out is not None:
    reports.write_json(out, report)
    print(f"plan: {out}")
  return 0 if report["fits"] else 1


# Each command: a handler (config, workdir) -> (report, ok), or an exit status when it ends
# early; `_run` applies the command's flags to the config, writes the report (with that
# config) and maps ok to the exit status.

def _stoppable(handler):
  """A handler whose training may be stopped: a non-finite loss is one stderr line and
  status 1; SIGTERM inside a pipeline's training stage (saved) one line and status 0, and
  nothing after that stage runs. What finished stays (checkpoints, cached layers, rows)."""
  def wrapped(config, workdir):
    from dihal_jax.bridge.training_loop import TrainingInterrupted, TrainingStopped
    try:
      return handler(config, workdir)
    except TrainingStopped as e:
      print(f"dihal: training stopped: {e}", file=sys.stderr)
      return 1
    except TrainingInterrupted as e:
      print(f"SIGTERM: stopped while training {e}; the same command resumes")
      return 0
  return wrapped


def _convert(config, workdir):
  from dihal_jax.backbone import checkpoint
  report = checkpoint.convert_and_export(config, workdir)
  ok = report["roundtrip"]["bit_identical"]
  print(f"converted {report['num_params']:,} params on {report['devices']} device(s); "
        f"exported to {report['exported']}; round trip bit-identical: {ok}")
  return report, ok


def _parity(config, workdir):
  from dihal_jax.backbone import parity
  report = parity.run_parity(config, workdir)
  print(parity.summary(report))
  return report, report["passed"]


def _generate(config, workdir):
  from dihal_jax import demo
  report = demo.generate_text(config, workdir, FLAGS.prompt, FLAGS.max_new_tokens,
                              FLAGS.temperature, FLAGS.top_p)
  for row in report["samples"]:
    print(f"--- {row['prompt']!r}\n{row['continuation']}")
  return report, True


def _data(config, workdir):
  from dihal_jax.data import dataset
  report = dataset.prepare_data(config, workdir)
  print(dataset.summary(report))
  return report, True


def _locate(config, workdir):
  from dihal_jax.geometry import locate
  report = locate.run_locate(config, workdir)
  locate.plot(report, workdir / "geometry.png")
  print(locate.summary(report))
  return report, True


@_stoppable
def _train(config, workdir):
  from dihal_jax.hybrid.tolerant_decoder import train_with_decoder
  report = train_with_decoder(config, workdir)
  print(f"trained the bridge at layer {report['layer']} to step {report['steps']}: "
        f"{report['final']}")
  if "tolerant_decoder" in report:
    print(f"trained the tolerant decoder to step {report['tolerant_decoder']['steps']}: "
          f"validation NLL {report['tolerant_decoder']['val_nll']}")
  return report, True


@_stoppable
def _mdm(config, workdir):
  from dihal_jax.mdm import train as mdm_train
  report = mdm_train.run_mdm(config, workdir)
  print(f"trained the masked diffusion model to step {report['steps']} of "
        f"{report['total_steps']}: {report['final']}")
  return report, True


def _sample(config, workdir):
  from dihal_jax.hybrid import sample
  from dihal_jax.mdm import generate as mdm_generate
  prompts = FLAGS.prompt
  if len(prompts) > 1:
    return _fail("sample: give at most one --prompt")
  from dihal_jax.dglm import sample as dglm_sample
  run_sample = {"mdm": mdm_generate.run_sample, "dglm": dglm_sample.run_sample}.get(
      config.sample.method, sample.run_sample)
  report = run_sample(config, workdir, prompt=prompts[0] if prompts else "",
                      infill=FLAGS.infill)
  for text in report["preview"]:
    print(f"--- {text!r}")
  print(f"{report['num']} samples ({report['readout']}) -> {report['samples']}")
  return report, True


@_stoppable  # the l = 0 bridge and the MDMs train first where missing
def _eval(config, workdir):
  from dihal_jax.eval import evaluate
  report = evaluate.run_eval(config, workdir)
  print(evaluate.summary(report))
  return report, True


@_stoppable  # finished layers stay cached
def _sweep(config, workdir):
  from dihal_jax.eval import sweep
  report = sweep.run_sweep(config, workdir, sweep.parse_layers(FLAGS.layers))
  sweep.plot(report, workdir / "sweep.png")
  print(sweep.summary(report))
  return report, True


@_stoppable  # finished rows stay
def _ablate(config, workdir):
  from dihal_jax.eval import ablation
  report = ablation.run_ablation(config, workdir)
  print(ablation.summary(report))
  return report, True


def _mechanism(config, workdir):
  from dihal_jax.analysis import mechanism
  report = mechanism.run_mechanism(config, workdir)
  print(mechanism.summary(report))
  return report, True


@_stoppable
def _dglm(config, workdir):
  from dihal_jax.dglm import run as dglm_run
  report = dglm_run.run_dglm(config, workdir)
  print(dglm_run.summary(report))
  return report, True


@_stoppable
def _demo(config, workdir):
  from dihal_jax import demo
  report = demo.run_demo(config, workdir)
  return report, report["parity"]["passed"]


HANDLERS = {"convert": _convert, "parity": _parity, "generate": _generate, "data": _data,
            "locate": _locate, "train": _train, "mdm": _mdm, "sample": _sample, "eval": _eval,
            "sweep": _sweep, "ablate": _ablate, "mechanism": _mechanism, "dglm": _dglm,
            "demo": _demo}
# Command flags that set a config field (sample.<name>), applied before the handler runs.
FLAG_FIELDS = {"sample": ("num", "length", "steps", "readout", "method", "attribute")}
REPORT_NAMES = {"sample": "sample_report.json"}  # beside eval's report.json, not over it


def _run(command: str, config, workdir: Path) -> int:
  from dihal_jax import reports
  from dihal_jax.overrides import overridden
  updates = {f"{command}.{name}": getattr(FLAGS, name) for name in FLAG_FIELDS.get(command, ())
             if getattr(FLAGS, name) is not None}
  if updates:
    config = overridden(config, updates)
  result = HANDLERS[command](config, workdir)
  if isinstance(result, int):
    return result
  report, ok = result
  report["config"] = config.to_dict()
  name = REPORT_NAMES.get(command, "report.json")
  reports.write_json(workdir / name, report)
  print(f"report: {workdir / name}")
  return 0 if ok else 1



def run():
  """Console-script entry point."""
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  run()
