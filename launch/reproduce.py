r"""Run the comparisons of the results table: uniform vs global vs contextual budgets.

  python -m launch.reproduce --data_dir ../shared/data --families mnist,cifar,mnist_canvas,cifar_canvas

For each preset of the chosen families: train (resuming if its workdir has a checkpoint), evaluate
on --num_examples test images, and write ``results/<preset>.json`` with the command, machine and
wall-clock; then ``results/README.md`` gets the Markdown table of every result file present.
``--schedule=paper`` runs the paper-scale schedules (for a GPU/TPU).
"""

import json
import os
import platform
import sys
import time

import jax
from absl import flags

from launch import presets
from launch.common import run_main

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
flags.DEFINE_integer("crown_examples", 200, "Full CROWN on the first N test examples only.")


def machine() -> str:
  d = jax.devices()[0]
  return f"{platform.machine()} {os.cpu_count()} cores, {d.platform}:{d.device_kind}"


def run_preset(name: str) -> dict:
  from cbudget.evaluate import evaluate
  from cbudget.train import train

  overrides = dict(workdir=os.path.join(FLAGS.workdir_root, name), data_dir=FLAGS.data_dir)
  if FLAGS.epochs:
    overrides["epochs"] = FLAGS.epochs
  if FLAGS.num_train_examples:
    overrides["num_train_examples"] = FLAGS.num_train_examples
  config = presets.train_config(name, FLAGS.schedule, **overrides)
  t0 = time.time()
  if train(config)["interrupted"]:
    sys.exit(f"interrupted while training {name}; run the same command to resume")
  t_train = time.time() - t0
  t1 = time.time()
  results = evaluate(
    config.workdir,
    num_examples=FLAGS.num_examples,
    methods=tuple(FLAGS.methods),
    crown_chunk_size=FLAGS.crown_chunk_size,
    crown_examples=FLAGS.crown_examples,
  )
  results.update(
    preset=name,
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
      f"--data_dir DATA --workdir W"
      + (f" --epochs {FLAGS.epochs}" if FLAGS.epochs else "")
      + (f" --num_train_examples {FLAGS.num_train_examples}" if FLAGS.num_train_examples else "")
      + f" && python -m launch.evaluate --workdir W --num_examples "
      f"{FLAGS.num_examples} --crown_examples {FLAGS.crown_examples}"
      + (
        f" --methods {','.join(FLAGS.methods)}"
        if tuple(FLAGS.methods) != ("ibp", "crown-ibp", "crown")
        else ""
      )
    ),
  )
  return results


def table(results_dir: str) -> str:
  rows = []
  for fname in sorted(os.listdir(results_dir)):
    if fname.endswith(".json"):
      with open(os.path.join(results_dir, fname)) as f:
        rows.append(json.load(f))
  head = (
    "| preset | data | model | budgets | ε₀ | epochs | clean | PGD | cert. IBP | cert. CROWN-IBP "
    "| cert. CROWN* | AUROC | out/in | train s | machine |\n|" + "---|" * 15
  )
  lines = [head]
  for r in rows:
    c = r["certified_error"]
    auroc = f"{r['relevance_auroc']:.3f}" if "relevance_auroc" in r else "–"
    ratio = f"{r['budget_ratio_out_in']:.2f}" if "budget_ratio_out_in" in r else "–"
    lines.append(
      f"| {r['preset']} | {r['dataset']} | {r['model']} | {r['budget_mode']} | {r['eps']:.4g} | "
      f"{r['epochs']} | {100 * r['clean_error']:.1f} | {100 * r['pgd_error']:.1f} | "
      + " | ".join(f"{100 * c[m]:.1f}" if m in c else "–" for m in ("ibp", "crown-ibp", "crown"))
      + f" | {auroc} | {ratio} | {r['train_seconds']:.0f} | {r['machine']} |"
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
  for name in names:
    print(f"== {name}", flush=True)
    results = run_preset(name)
    atomic_write_text(
      os.path.join(FLAGS.results_dir, f"{name}.json"), json.dumps(results, indent=2) + "\n"
    )
    print(
      json.dumps({k: results[k] for k in ("clean_error", "pgd_error", "certified_error")}),
      flush=True,
    )
    atomic_write_text(
      os.path.join(FLAGS.results_dir, "README.md"),
      "# Results\n\nErrors in %, on the first test examples (*full CROWN on fewer: see "
      "`certified_examples`); the JSON files hold budget statistics and "
      "commands.\n\n" + table(FLAGS.results_dir),
    )
  print(table(FLAGS.results_dir))


if __name__ == "__main__":
  run_main(main)
