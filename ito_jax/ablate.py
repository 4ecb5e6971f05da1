"""ITO ablation: baseline, multiple alignment only, fusion only, full ITO.

  python -m ito_jax.ablate --config=configs/ito_tiny_cpu.py --workdir=DIR

Given a partially aligned config (`partial.enabled`), the same command runs
the OT comparison instead (`ito_jax.ot_compare`: contrastive-only, +R_ot loop,
+R_ot barycenter) at each ρ of --aligned_fractions (default 0.05 and 0.2):

  python -m ito_jax.ablate --config=configs/ot_partial_tiny_cpu.py --workdir=DIR

Each variant is the given (full ITO) config with mechanisms switched off, and
trains with the same seed, data and steps in DIR/<variant>. A variant whose
eval.json exists is not trained again, so an interrupted ablation resumes (a
finished run of a different config is an error, not silently reused).
Writes DIR/ablation.json, DIR/ablation.md and DIR/ablation_gap.png.

--seeds=0,1,2 repeats every variant with each training seed (init, data order,
augmentation; the data set itself is fixed) in DIR/<variant>_seed<s> (the
config's own seed keeps DIR/<variant>). The tables then hold the mean over
seeds and ablation.json also the standard deviation ('std/<key>') and each
seed's figures: on the tiny CPU runs one seed's R@1 moves by about 0.01.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ito_jax import cli
from ito_jax.metrics import read_jsonl

VARIANTS = ("baseline", "multi_align", "fusion", "ito")
TABLE_KEYS = ("retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/i2t_r5", "retrieval/t2i_r5",
              "zeroshot/accuracy", "gap/centroid_distance", "gap/modality_classifier_acc",
              "gap/matched_cosine", "saturation/frac_positive_prob_gt_099",
              "saturation/mean_margin", "loss/align")


def variant_config(full: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """The full-ITO config with the mechanisms `variant` leaves out switched off."""
  if variant not in VARIANTS:
    raise cli.BadArgument(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  c = ml_collections.ConfigDict(full.to_dict())
  c.lock()
  if variant in ("baseline", "fusion"):
    c.loss.num_image_views = 1
    c.loss.num_text_views = 1
  if variant in ("baseline", "multi_align"):
    c.model.fusion.enabled = False
    c.loss.itm_weight = 0.0
    c.loss.anchor_weight = 0.0
  return c


def check_variant_names(variants, known) -> None:
  """Refuses a --variants list with a name outside `known`, or one named twice
  (it would train once and fill two rows). Run before the first variant
  trains: a typo at the end of the list must not cost the runs before it."""
  unknown = [v for v in variants if v not in known]
  if unknown or not variants:
    raise cli.BadArgument(f"--variants: unknown {unknown}; expected some of {known}")
  if repeated := sorted({v for v in variants if list(variants).count(v) > 1}):
    raise cli.BadArgument(f"--variants: {repeated} named more than once")


def check_variants_differ(full: ml_collections.ConfigDict, variants) -> None:
  """Raises cli.BadArgument when two of `variants` would train the same config:
  the given config lacks a mechanism they tell apart, so their rows would
  compare a run with itself."""
  seen = {}
  for v in variants:
    key = variant_config(full, v).to_json_best_effort(sort_keys=True)
    if key in seen:
      raise cli.BadArgument(
          f"variants {seen[key]!r} and {v!r} train the same config: the given config has "
          f"multiple alignment {'on' if full.loss.num_image_views * full.loss.num_text_views > 1 else 'off'} "
          f"(loss.num_image_views x loss.num_text_views = {full.loss.num_image_views} x "
          f"{full.loss.num_text_views}) and the fusion head {'on' if full.model.fusion.enabled else 'off'} "
          f"(model.fusion.enabled); the ablation switches these off, so pass the full-ITO config "
          f"(e.g. configs/ito_tiny_cpu.py)")
    seen[key] = v


class Preempted(Exception):
  """A run stopped at a preemption signal with its checkpoint saved. The
  comparison stops there and writes no tables: rerunning the same command
  resumes that run and reads back the runs that finished."""


def train_run(train, config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """train.train_and_evaluate(config, run_dir), raising Preempted if a
  preemption signal stopped it (the next run must not start, nor a table hold
  a run that did not finish)."""
  result = train.train_and_evaluate(config, run_dir)
  if result.get("preempted"):
    raise Preempted(f"{run_dir}: preempted, checkpoint of step {result['step']} saved; "
                    "rerun the same command to resume")
  return result


def final_metrics(workdir: str) -> dict:
  """eval.json plus the last logged training saturation and alignment loss."""
  with open(os.path.join(workdir, "eval.json")) as f:
    out = json.load(f)
  train_lines = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  for key in ("saturation/frac_positive_prob_gt_099", "saturation/mean_margin", "loss/align"):
    out[key] = train_lines[-1][key]
  return out


def over_seeds(per_seed: dict) -> dict:
  """{seed: figures} -> the mean of each numeric figure, plus 'std/<key>'
  (population standard deviation) and 'per_seed' when there is more than one."""
  keys = [k for k, v in next(iter(per_seed.values())).items()
          if isinstance(v, (int, float)) and all(k in m for m in per_seed.values())]
  out = {k: float(np.mean([m[k] for m in per_seed.values()])) for k in keys}
  if len(per_seed) > 1:
    out.update({f"std/{k}": float(np.std([m[k] for m in per_seed.values()])) for k in keys})
    out["per_seed"] = {str(s): m for s, m in per_seed.items()}
  return out


def finished(run_dir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether run_dir holds a finished run (its eval.json) of exactly `config`.
  A run of another config there, finished or not (a preempted run's checkpoint
  would be resumed under this config), is an error naming what differs, so
  that a reused workdir never mixes runs of different settings into one table."""
  done = os.path.exists(os.path.join(run_dir, "eval.json"))
  if not done and not os.path.exists(os.path.join(run_dir, "config.json")):
    return False
  if differ := _differences(run_dir, config):
    state = "finished earlier" if done else "holds an unfinished (preempted) run"
    raise cli.BadArgument(f"{run_dir}: {state} with another config ({', '.join(differ[:5])} "
                          "differ); use another --workdir or delete that run")
  return done


def _differences(run_dir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The config fields whose values differ between run_dir/config.json and `config`."""
  from ito_jax import checkpoint  # orbax and jax load only when a saved run is compared
  with open(os.path.join(run_dir, "config.json")) as f:  # fields added since: their defaults
    saved = checkpoint.config_to_json(checkpoint.config_from_json(json.load(f)))
  wanted = json.loads(config.to_json_best_effort())

  def flat(d, prefix=""):
    return {k2: v2 for k, v in d.items()
            for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}

  a, b = flat(saved), flat(wanted)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def format_cell(m: dict, key: str) -> str:
  """'mean ± std' when the figures span several seeds (over_seeds), else the value."""
  value = m.get(key, float("nan"))
  return f"{value:.3f} ± {m['std/' + key]:.3f}" if "std/" + key in m else f"{value:.3f}"


def markdown_table(results: dict) -> str:
  """One row per variant; 'mean ± std' cells when the figures span several seeds."""
  header = "| variant | " + " | ".join(TABLE_KEYS) + " |"
  rule = "|---" * (len(TABLE_KEYS) + 1) + "|"
  rows = [f"| {v} | " + " | ".join(format_cell(m, k) for k in TABLE_KEYS) + " |"
          for v, m in results.items()]
  return "\n".join([header, rule, *rows]) + "\n"


def plot_gap(workdir: str, run_dirs: dict) -> str:
  """Gap curves of one run per variant ({variant: run dir}) into DIR/ablation_gap.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for v, run_dir in run_dirs.items():
    lines = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in lines if "gap/batch_centroid_distance" in r]
    evals = [r for r in lines if "gap/centroid_distance" in r]
    axes[0].plot([r["step"] for r in train], [r["gap/batch_centroid_distance"] for r in train], label=v)
    axes[1].plot([r["step"] for r in evals], [r["gap/centroid_distance"] for r in evals], "o-", label=v)
  axes[0].set_title("training batch: image-text centroid distance")
  axes[1].set_title("held-out: image-text centroid distance")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  path = os.path.join(workdir, "ablation_gap.png")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run_ablation(full: ml_collections.ConfigDict, workdir: str, variants, seeds) -> dict:
  """Trains (or reads back) every variant of the full-ITO config with each
  seed under workdir and writes the tables and the gap plot; returns
  {variant: figures}. A run stopped by a preemption signal raises Preempted
  before any table is written; the same call resumes it."""
  from ito_jax import train  # jax and the data stack load only when running

  check_variant_names(variants, VARIANTS)
  if not full.data.data_dir:  # one data set for all variants: generated once under DIR/data
    full.data.data_dir = os.path.join(workdir, "data")
  seeds = list(seeds or [full.seed])
  check_variants_differ(full, variants)
  results, first_runs = {}, {}
  for v in variants:
    per_seed = {}
    for seed in seeds:
      run_dir = os.path.join(workdir, v if seed == full.seed else f"{v}_seed{seed}")
      config = variant_config(full, v)
      config.seed = seed
      if not finished(run_dir, config):
        print(f"== training variant {v}, seed {seed}, in {run_dir}")
        train_run(train, config, run_dir)
      per_seed[seed] = final_metrics(run_dir)
      first_runs.setdefault(v, run_dir)
    results[v] = over_seeds(per_seed)
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  table = markdown_table(results)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(table)
  print(table)
  print("gap plot:", plot_gap(workdir, first_runs))
  return results


def main(argv):
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required")
  workdir, seeds = FLAGS.workdir, [int(s) for s in FLAGS.seeds]
  try:
    if FLAGS.config.partial.enabled:
      from ito_jax import ot_compare

      variants = FLAGS.variants or list(ot_compare.VARIANTS)
      fractions = [float(v) for v in FLAGS.aligned_fractions]
      rows = ot_compare.compare(FLAGS.config, workdir, variants, fractions, seeds)
      print(f"\n{os.path.join(workdir, 'ablation.md')}:\n{ot_compare.table(rows)}")
    else:
      run_ablation(FLAGS.config, workdir, FLAGS.variants or list(VARIANTS), seeds)
  except Preempted as e:
    print(f"\nPreempted: {e}")


FLAGS = flags.FLAGS

if __name__ == "__main__":
  # Flags are defined only when run as a program, so tests can import the
  # variant logic next to other modules that define --config.
  config_flags.DEFINE_config_file("config", None, "The full-ITO config.")
  flags.DEFINE_string("workdir", None, "Directory for the four runs and the tables.")
  flags.DEFINE_list("seeds", [], "Training seeds to repeat every variant with (default: the "
                    "config's seed); the tables give mean ± std.")
  flags.DEFINE_list("variants", None, "Subset of variants to run (default: all four; for a "
                    "partially aligned config: contrastive, loop, barycenter).")
  flags.DEFINE_list("aligned_fractions", ["0.05", "0.2"],
                    "Partially aligned configs only: the ρ values to compare.")
  # Run the importable module's main, not this __main__ copy's: ot_compare
  # imports ito_jax.ablate and raises *its* Preempted, which a `except
  # Preempted` here (another class object) would not catch.
  from ito_jax import ablate as _module  # pylint: disable=g-import-not-at-top
  cli.run(_module.main)
