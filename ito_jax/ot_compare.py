"""Contrastive-only vs +R_ot (loop) vs +R_ot (barycenter) on partially aligned data.

  python -m ito_jax.ot_compare --config=configs/ot_partial_tiny_cpu.py --workdir=DIR
  python -m ito_jax.ot_compare --config=... --workdir=DIR --aligned_fractions=0.05,0.2
  python -m ito_jax.ot_compare --config=... --workdir=DIR --seeds=0,1,2   # mean ± std

Every run uses the same config, seed, data set, split, tokenizer and step
count; only the objective differs (`loss.ot_weight = loss.ot_plan_contrast_weight = 0`,
or `ot.variant`).
Runs go to DIR/rho{ρ}_{name}/ (metrics.jsonl, eval.json); the data set is
built once in DIR/data. Writes DIR/ablation.json and DIR/ablation.md and
prints the table: held-out retrieval R@1 both ways (all, and unseen-class
queries), generalised zero-shot accuracy on seen and unseen classes, and the
modality gap.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from ito_jax import cli
from ito_jax import ablate  # its tables and run bookkeeping; it imports this module only in main

VARIANTS = ("contrastive", "loop", "barycenter")
COLUMNS = (  # (eval key, column title)
    ("retrieval/i2t_r1", "R@1 i2t"),
    ("retrieval/t2i_r1", "R@1 t2i"),
    ("retrieval/unseen_i2t_r1", "unseen R@1 i2t"),
    ("retrieval/unseen_t2i_r1", "unseen R@1 t2i"),
    ("zeroshot/seen_accuracy", "ZS seen"),
    ("zeroshot/unseen_accuracy", "ZS unseen"),
    ("zeroshot/harmonic_mean", "ZS H"),
    ("gap/centroid_distance", "gap"),
)


def run_config(base: ml_collections.ConfigDict, variant: str, aligned_fraction: float,
               data_dir: str) -> ml_collections.ConfigDict:
  """The base config with one run's objective and ρ."""
  if variant not in VARIANTS:
    raise cli.BadArgument(f"--variants: unknown {variant!r}; expected some of {VARIANTS}")
  c = base.copy_and_resolve_references()
  c.partial.aligned_fraction = aligned_fraction
  c.data.data_dir = data_dir
  if variant == "contrastive":
    c.loss.ot_weight = 0.0
    c.loss.ot_plan_contrast_weight = 0.0
  else:
    c.ot.variant = variant
  return c


_MINUTES = "train_minutes.json"  # in each run dir: its training minutes so far


def _minutes(run_dir: str) -> float:
  """The training minutes recorded for run_dir, NaN for a run finished
  before they were recorded."""
  try:
    with open(os.path.join(run_dir, _MINUTES)) as f:
      return float(json.load(f)["minutes"])
  except FileNotFoundError:
    return float("nan")


def _add_minutes(run_dir: str, minutes: float) -> None:
  earlier = _minutes(run_dir)
  total = minutes + (0.0 if math.isnan(earlier) else earlier)  # NaN: none recorded yet
  tmp = os.path.join(run_dir, _MINUTES + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"minutes": total}, f)
  os.replace(tmp, os.path.join(run_dir, _MINUTES))


def table(rows: list[dict]) -> str:
  """Markdown: one row per (ρ, run); 'mean ± std' cells when a row spans several
  seeds; 'min' is the training minutes, summed over the row's seeds (recorded
  in each run dir, so runs read back keep theirs; a run trained again after a
  hard kill counts only what its resumed invocations timed)."""
  head = ["ρ", "run", "seeds", *[t for _, t in COLUMNS], "min"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"{r['aligned_fraction']:g}", r["run"], ",".join(map(str, r.get("seeds", [])))]
    cells += [ablate.format_cell(r["eval"], k) for k, _ in COLUMNS]
    cells.append(f"{r['train_minutes']:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def compare(base: ml_collections.ConfigDict, workdir: str, variants, fractions,
            seeds=None) -> list[dict]:
  """Trains every (ρ, variant, seed) run, or reads it back when it finished
  earlier with the same config (so an interrupted comparison resumes; another
  config is an error, `ablate.finished`), and writes the tables.

  seeds: training seeds (init, data order, augmentation; the data set and its
  split stay fixed); None or empty means the config's own. The config's seed
  runs in DIR/rho{ρ}_{variant}, others in DIR/rho{ρ}_{variant}_seed{s}; a row
  holds the mean over seeds, and with several seeds 'std/<key>' and each
  seed's figures ('per_seed'). A run stopped by a preemption signal raises
  ablate.Preempted before any table is written; the same call resumes it."""
  from ito_jax import train  # jax and the data stack load only when running

  if not base.partial.enabled:
    raise cli.BadArgument("config.partial.enabled: ot_compare needs a partially aligned config")
  ablate.check_variant_names(variants, VARIANTS)
  seeds = list(seeds or [base.seed])
  os.makedirs(workdir, exist_ok=True)
  data_dir = base.data.data_dir or os.path.join(workdir, "data")
  rows, tokenizer = [], None
  for rho in fractions:
    for variant in variants:
      per_seed, minutes, run_dirs = {}, 0.0, []
      for seed in seeds:
        config = run_config(base, variant, rho, data_dir)
        config.seed = seed
        name = f"rho{rho:g}_{variant}" + ("" if seed == base.seed else f"_seed{seed}")
        run_dir = os.path.join(workdir, name)
        run_dirs.append(run_dir)
        if ablate.finished(run_dir, config):
          with open(os.path.join(run_dir, "eval.json")) as f:
            per_seed[seed] = json.load(f)
          print(f"== {name}: finished earlier, read back", flush=True)
        else:
          os.makedirs(run_dir, exist_ok=True)
          if tokenizer:  # one tokenizer for all runs (train.prepare_inputs loads it if present)
            shutil.copyfile(tokenizer, os.path.join(run_dir, "tokenizer.model"))
          t0 = time.perf_counter()
          try:
            per_seed[seed] = ablate.train_run(train, config, run_dir)
          finally:  # a preempted run's minutes add up over the invocations that resume it
            _add_minutes(run_dir, (time.perf_counter() - t0) / 60)
        minutes += _minutes(run_dir)
        tokenizer = tokenizer or os.path.join(run_dir, "tokenizer.model")
      rows.append({"aligned_fraction": rho, "run": variant, "seeds": seeds,
                   "workdirs": run_dirs,
                   "train_minutes": minutes, "eval": ablate.over_seeds(per_seed)})
      print(table(rows), flush=True)
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump({"config": json.loads(base.to_json_best_effort()), "runs": rows}, f, indent=2)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(table(rows) + "\n")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None:
    raise app.UsageError("--config is required")
  fractions = [float(v) for v in flags.FLAGS.aligned_fractions] or [config.partial.aligned_fraction]
  try:
    rows = compare(config, workdir, flags.FLAGS.variants, fractions,
                   [int(v) for v in flags.FLAGS.seeds])
  except ablate.Preempted as e:
    print(f"\nPreempted: {e}")
    return
  print(f"\n{os.path.join(workdir, 'ablation.md')}:\n{table(rows)}")


if __name__ == "__main__":
  # Flags only when run as a command, so `compare` imports next to other absl tools.
  config_flags.DEFINE_config_file("config", None, "Partially aligned config (partial.enabled).")
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.DEFINE_list("variants", ["contrastive", "loop", "barycenter"],
                    "Runs: contrastive (ot_weight 0), loop, barycenter.")
  flags.DEFINE_list("aligned_fractions", [], "ρ values; empty: the config's.")
  flags.DEFINE_list("seeds", [], "Training seeds to repeat every run with; empty: the config's.")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
