r"""Run the comparisons of the results table: uniform vs global vs contextual budgets.

  python -m launch.reproduce --data_dir ../shared/data --families mnist_canvas --seeds 0,1,2 \
      --volume effective
  python -m launch.reproduce --data_dir ../shared/data --only mnist_canvas_uniform,\
mnist_canvas_contextual --sweep_eps 0.05,0.1,0.15      # certified error against the volume

For each preset of the chosen families, each seed (and each ε₀ of --sweep_eps): train (resuming if
its workdir has a checkpoint), evaluate on --num_examples test images, and write
``results/<run>.json`` with the command, machine and wall-clock; then ``results/README.md`` gets
the Markdown table of every result file present, one row per preset and ε₀, mean ± std over seeds.
Every column of a row is measured on the same examples (the first ones every method covered), with
the per-example best over methods as its own column. ``--schedule=paper`` runs the paper-scale
schedules (for a GPU/TPU).
"""

import collections
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import flags

from cbudget.budgets import SQUASHES, VOLUMES
from launch import presets
from launch.common import mean_std, run_main

FLAGS = flags.FLAGS
flags.DEFINE_list(
  "families", ["mnist", "cifar", "mnist_canvas", "cifar_canvas"], "Preset families to run."
)
flags.DEFINE_list("only", [], "Run only these presets (names from launch/presets.py).")
flags.DEFINE_enum("schedule", "cpu", ["cpu", "paper"], "Reduced CPU schedules or the paper's.")
flags.DEFINE_string("data_dir", None, "Folder of the standard raw files (offline).")
flags.DEFINE_string("results_dir", "results", "Where the JSON files and table go.")
flags.DEFINE_string("workdir_root", "workdir/reproduce", "Training workdirs go under here.")
flags.DEFINE_integer("num_examples", 1000, "Test examples per evaluation.")
flags.DEFINE_list("methods", ["ibp", "crown-ibp", "crown"], "Certification methods.")
flags.DEFINE_integer("crown_chunk_size", None, "(Row, example) pairs per full-CROWN pass.")
flags.DEFINE_integer("epochs", None, "Override the preset's epochs.")
flags.DEFINE_integer("num_train_examples", None, "Override: train on the first N examples.")
flags.DEFINE_integer(
  "crown_examples",
  None,
  "Full CROWN on the first N test examples only; then every column of the table is on those N.",
)
flags.DEFINE_list("seeds", ["0"], "Seeds: one run each; the table shows mean ± std.")
flags.DEFINE_enum("volume", None, list(VOLUMES), "Override the preset's volume.")
flags.DEFINE_list("sweep_eps", [], "Train and evaluate each preset at each of these ε₀.")
flags.DEFINE_enum(
  "squash", None, list(SQUASHES), "Override how raw budgets enter the range (cbudget.budgets)."
)


def machine() -> str:
  d = jax.devices()[0]
  return f"{platform.machine()} {os.cpu_count()} cores, {d.platform}:{d.device_kind}"


def run_name(preset: str, seed: int, eps: float | None, squash: str | None = None) -> str:
  eps_part = f"-eps{eps:g}" if eps is not None else ""
  return preset + eps_part + (f"-{squash}" if squash == "sigmoid" else "") + f"-s{seed}"


def training_seconds(workdir: str) -> float:
  """Wall-clock of a run's training as its metrics log records it, summed over the processes that
  trained it (each logs ``seconds`` since it started, and a ``resumed`` event when one starts on a
  checkpoint); the time of a process cut off between two logs is not counted."""
  from cbudget.workdir import read_metrics

  total = segment = 0.0
  for record in read_metrics(workdir):
    if record.get("event") == "resumed":
      total, segment = total + segment, 0.0
    elif "seconds" in record:
      segment = record["seconds"]
  return total + segment


def run_preset(name: str, seed: int, eps: float | None = None) -> dict:
  from cbudget.evaluate import evaluate
  from cbudget.train import train

  overrides = dict(
    workdir=os.path.join(FLAGS.workdir_root, run_name(name, seed, eps, FLAGS.squash)),
    data_dir=FLAGS.data_dir,
    seed=seed,
  )
  flags_given = f" --seed {seed}"
  for key, value in (
    ("epochs", FLAGS.epochs),
    ("num_train_examples", FLAGS.num_train_examples),
    ("volume", FLAGS.volume),
    ("squash", FLAGS.squash),
    ("eps", eps),
  ):
    if value is not None:
      overrides[key] = value
      flags_given += f" --{key} {value}"
  config = presets.train_config(name, FLAGS.schedule, **overrides)
  if train(config)["interrupted"]:
    sys.exit(f"interrupted while training {name}; run the same command to resume")
  t_train = training_seconds(config.workdir)  # also right when this call only resumed a run
  t1 = time.time()
  results = evaluate(
    config.workdir,
    num_examples=FLAGS.num_examples,
    methods=tuple(FLAGS.methods),
    crown_chunk_size=FLAGS.crown_chunk_size,
    crown_examples=FLAGS.crown_examples,
  )
  evaluate_flags = f" --num_examples {FLAGS.num_examples} --methods {','.join(FLAGS.methods)}"
  if FLAGS.crown_examples:
    evaluate_flags += f" --crown_examples {FLAGS.crown_examples}"
  results.update(
    preset=name,
    seed=seed,
    schedule=FLAGS.schedule,
    epochs=config.epochs,
    method=config.method,
    num_train_examples=config.num_train_examples,
    budget_range=list(config.budget_range),
    train_seconds=round(t_train, 1),
    eval_seconds=round(time.time() - t1, 1),
    machine=machine(),
    command=(
      f"python -m launch.train --preset {name} --schedule {FLAGS.schedule} "
      f"--data_dir DATA --workdir W{flags_given} && python -m launch.evaluate --workdir W"
      + evaluate_flags
    ),
  )
  return results


def table(results_dir: str) -> str:
  """One row per (preset, ε₀, volume): mean ± std over the seeds present, every column on the
  same examples (``common`` in each JSON)."""
  groups = collections.defaultdict(list)
  for fname in sorted(os.listdir(results_dir)):
    if fname.endswith(".json"):
      with open(os.path.join(results_dir, fname)) as f:
        r = json.load(f)
      if "common" in r:  # written before every column shared one example set: not comparable
        preset = r["preset"] + (" (sigmoid)" if r.get("squash") == "sigmoid" else "")
        groups[(preset, r["eps"], r.get("volume", "nominal"))].append(r)
  methods = ("ibp", "crown-ibp", "crown")
  head = (
    "| preset | ε₀ | volume | seeds | examples | clean | PGD | cert. IBP | cert. CROWN-IBP "
    "| cert. CROWN | cert. best | equiv. ε nominal / effective (uniform) | AUROC | context AUROC "
    "| intensity rule | train s | machine |\n|" + "---|" * 17
  )
  lines = [head]
  for (preset, eps, volume), rows in groups.items():
    common = [r["common"] for r in rows]
    b = {k: np.mean([r["budget"][k] for r in rows]) for k in rows[0]["budget"]}
    certified = [
      mean_std([c["certified_error"].get(m) for c in common])
      if m in common[0]["certified_error"]
      else "–"
      for m in methods
    ]
    lines.append(
      f"| {preset} | {eps:.4g} | {volume} | {len(rows)} | {common[0]['num_examples']} | "
      f"{mean_std([c['clean_error'] for c in common])} | {mean_std([c['pgd_error'] for c in common])} | "
      + " | ".join(certified)
      + f" | {mean_std([c['certified_error_best'] for c in common])} | "
      f"{b['equivalent_eps']:.3g} / {b['effective_equivalent_eps']:.3g} "
      f"({b['uniform_effective_equivalent_eps']:.3g}) | "
      f"{mean_std([r.get('relevance_auroc') for r in rows], 1, 3)} | "
      f"{mean_std([r.get('context_auroc') for r in rows], 1, 3)} | "
      f"{mean_std([r.get('intensity_rule_auroc') for r in rows], 1, 3)} | "
      f"{np.mean([r['train_seconds'] for r in rows]):.0f} | {rows[0]['machine']} |"
    )
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from cbudget.workdir import atomic_write_text

  os.makedirs(FLAGS.results_dir, exist_ok=True)
  names = FLAGS.only or [
    n
    for n in presets.PRESETS
    if presets.FAMILY[n] in FLAGS.families and n not in presets.METHOD_VARIANTS
  ]
  epsilons = [float(e) for e in FLAGS.sweep_eps] or [None]
  for name in names:
    for eps in epsilons:
      for seed in (int(s) for s in FLAGS.seeds):
        run = run_name(name, seed, eps, FLAGS.squash)
        print(f"== {run}", flush=True)
        results = run_preset(name, seed, eps)
        atomic_write_text(
          os.path.join(FLAGS.results_dir, f"{run}.json"), json.dumps(results, indent=2) + "\n"
        )
        print(json.dumps(results["common"]), flush=True)
        atomic_write_text(
          os.path.join(FLAGS.results_dir, "README.md"),
          "# Results\n\nErrors in % (mean ± std over seeds), every column of a row on the same "
          "test examples; the JSON files hold the per-run numbers, budget statistics and "
          "commands.\n\n" + table(FLAGS.results_dir),
        )
  print(table(FLAGS.results_dir))


if __name__ == "__main__":
  run_main(main)
