r"""Evaluate a training run: clean, PGD and certified error, budget statistics, a budget picture.

  python -m launch.evaluate --workdir workdir/demo
  python -m launch.evaluate --workdir workdir/uniform --threat budgets:workdir/contextual
  python -m launch.evaluate --workdir workdir/contextual --threat uniform:0.1

Writes ``eval.json`` and ``budgets.png`` in the workdir (under another model's budgets or a uniform
ε: ``eval-<threat>.json``, no picture).
"""

import json
import os
import re

from absl import flags

from cbudget.attacks import ATTACKS
from launch.common import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The --workdir of a training run.", required=True)
flags.DEFINE_integer("num_examples", 1000, "Evaluate the first N test examples (all: 0).")
flags.DEFINE_list(
  "methods", ["ibp", "crown-ibp", "crown"], "Bound methods: ibp, crown-ibp, crown, alpha-crown."
)
flags.DEFINE_integer("batch_size", 100, "Evaluation batch size.")
flags.DEFINE_integer("pgd_steps", 20, "PGD steps.")
flags.DEFINE_integer("pgd_restarts", 1, "PGD random restarts.")
flags.DEFINE_enum(
  "attack",
  "strong",
  list(ATTACKS),
  "pgd, or the worst of PGD and APGD with margin and CE loss.",
)
flags.DEFINE_integer(
  "crown_chunk_size",
  None,
  "(Neuron row, example) pairs per full-CROWN backward pass; default: "
  "as many as fit --crown_memory_gib.",
)
flags.DEFINE_float(
  "crown_memory_gib",
  None,
  "Memory for one full-CROWN backward pass; default cbudget.evaluate.DEFAULT_CROWN_MEMORY_GIB.",
)
flags.DEFINE_integer(
  "crown_examples", None, "Full CROWN (the slowest method) on the first N of the examples only."
)
flags.DEFINE_integer(
  "certified_box_examples",
  0,
  "Also find the largest box full CROWN certifies on the first N test examples (slow).",
)
flags.DEFINE_bool("x64", False, "Also certify in float64 and report float32-only certificates.")
flags.DEFINE_bool("plot", True, "Write budgets.png (images next to their budget maps).")
flags.DEFINE_string(
  "threat",
  "own",
  "Budgets to certify under: 'own' (the model's own at its ε₀), 'uniform:E' (ε = E everywhere) "
  "or 'budgets:WORKDIR' (the budgets another run's model gives the same images).",
)

flags.register_validator("num_examples", lambda v: v >= 0, "--num_examples must be >= 0")
flags.register_validator("pgd_steps", lambda v: v >= 1, "--pgd_steps must be >= 1")
flags.register_validator(
  "crown_examples", lambda v: v is None or v >= 1, "--crown_examples must be >= 1"
)


def main(argv):
  del argv
  from cbudget.evaluate import evaluate
  from cbudget.workdir import atomic_write_text

  own = FLAGS.threat == "own"
  plot = os.path.join(FLAGS.workdir, "budgets.png") if FLAGS.plot and own else None
  options = {
    name: FLAGS[name].value
    for name in (
      "batch_size",
      "pgd_steps",
      "pgd_restarts",
      "attack",
      "crown_chunk_size",
      "crown_memory_gib",
      "crown_examples",
      "x64",
      "certified_box_examples",
    )
  }
  results = evaluate(
    FLAGS.workdir,
    num_examples=FLAGS.num_examples or None,
    plot=plot,
    methods=tuple(FLAGS.methods),
    threat=FLAGS.threat,
    **options,
  )
  name = "eval.json" if own else f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '_', FLAGS.threat)}.json"
  out = os.path.join(FLAGS.workdir, name)
  atomic_write_text(out, json.dumps(results, indent=2) + "\n")
  common = results["common"]
  print(
    f"{results['dataset']} / {results['model']} / {results['budget_mode']} budgets, "
    f"ε₀ = {results['eps']:.4g}, threat {results['threat']}, {common['num_examples']} test "
    "examples (every number on the same examples)"
  )
  print(f"  clean error      {common['clean_error']:.4f}")
  print(f"  PGD error        {common['pgd_error']:.4f}")
  for method, err in common["certified_error"].items():
    print(f"  certified error  {err:.4f}  ({method})")
  print(f"  certified error  {common['certified_error_best']:.4f}  (best per example)")
  if common["num_examples"] < results["num_examples"]:
    print(
      f"  on all {results['num_examples']} examples: "
      + ", ".join(f"{m} {e:.4f}" for m, e in results["certified_error"].items())
    )
  if "certified_box" in results:
    box = results["certified_box"]
    print(
      f"  largest certified box (full CROWN, {box['num_examples']} examples): median equivalent ε "
      f"{box['median_equivalent_eps']:.4g}, {box['median_ratio'] or float('nan'):.3g}x the "
      "certified uniform ε"
    )
  b = results["budget"]
  print(
    f"  budgets: equivalent ε {b['equivalent_eps']:.4g} nominal, "
    f"{b['effective_equivalent_eps']:.4g} effective (uniform ε₀: "
    f"{b['uniform_effective_equivalent_eps']:.4g}), range [{b['min']:.4g}, {b['max']:.4g}]"
  )
  if "relevance_auroc" in results:
    print(
      f"  budget–relevance AUROC {results['relevance_auroc']:.3f}, context AUROC "
      f"{results['context_auroc']:.3f}, mean budget out/in mask "
      f"{results['budget_ratio_out_in']:.2f}; best intensity rule AUROC "
      f"{results['intensity_rule_auroc']:.3f} ({results['intensity_rule']})"
    )
  if plot is not None:
    print(f"  wrote {plot}")
  print(f"  wrote {out}")


if __name__ == "__main__":
  run_main(main)
