r"""Evaluate a training run: clean, PGD and certified error, budget statistics, a budget picture.

  python -m launch.evaluate --workdir workdir/demo

Writes ``eval.json`` and ``budgets.png`` in the workdir.
"""

import json
import os

from absl import flags

from launch.common import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The --workdir of a training run.", required=True)
flags.DEFINE_integer("num_examples", 1000, "Evaluate the first N test examples (all: 0).")
flags.DEFINE_list("methods", ["ibp", "crown-ibp", "crown"], "Bound methods to certify with.")
flags.DEFINE_integer("batch_size", 100, "Evaluation batch size.")
flags.DEFINE_integer("pgd_steps", 20, "PGD steps.")
flags.DEFINE_integer("pgd_restarts", 1, "PGD random restarts.")
flags.DEFINE_enum(
  "attack",
  "strong",
  ["pgd", "strong"],
  "pgd, or the worst of PGD and APGD with margin and CE loss.",
)
flags.DEFINE_integer(
  "crown_chunk_size",
  None,
  "(Neuron row, example) pairs per full-CROWN backward pass; default: "
  "as many as fit --crown_memory_gib.",
)
flags.DEFINE_float("crown_memory_gib", 2.0, "Memory for one full-CROWN backward pass.")
flags.DEFINE_integer(
  "crown_examples", None, "Full CROWN (the slowest method) on the first N of the examples only."
)
flags.DEFINE_bool("x64", False, "Also certify in float64 and report float32-only certificates.")
flags.DEFINE_bool("plot", True, "Write budgets.png (images next to their budget maps).")

flags.register_validator("num_examples", lambda v: v >= 0, "--num_examples must be >= 0")
flags.register_validator("pgd_steps", lambda v: v >= 1, "--pgd_steps must be >= 1")
flags.register_validator(
  "crown_examples", lambda v: v is None or v >= 1, "--crown_examples must be >= 1"
)


def main(argv):
  del argv
  from cbudget.evaluate import evaluate
  from cbudget.workdir import atomic_write_text

  plot = os.path.join(FLAGS.workdir, "budgets.png") if FLAGS.plot else None
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
    )
  }
  results = evaluate(
    FLAGS.workdir,
    num_examples=FLAGS.num_examples or None,
    plot=plot,
    methods=tuple(FLAGS.methods),
    **options,
  )
  atomic_write_text(os.path.join(FLAGS.workdir, "eval.json"), json.dumps(results, indent=2) + "\n")
  print(
    f"{results['dataset']} / {results['model']} / {results['budget_mode']} budgets, "
    f"ε₀ = {results['eps']:.4g}, {results['num_examples']} test examples"
  )
  print(f"  clean error      {results['clean_error']:.4f}")
  print(f"  PGD error        {results['pgd_error']:.4f}")
  for method, err in results["certified_error"].items():
    print(f"  certified error  {err:.4f}  ({method})")
  b = results["budget"]
  print(
    f"  budgets: equivalent ε {b['equivalent_eps']:.4g}, range [{b['min']:.4g}, {b['max']:.4g}]"
  )
  if "relevance_auroc" in results:
    print(
      f"  budget–relevance AUROC {results['relevance_auroc']:.3f}, "
      f"mean budget out/in mask {results['budget_ratio_out_in']:.2f}"
    )
  if plot is not None:
    print(f"  wrote {plot}")
  print(f"  wrote {os.path.join(FLAGS.workdir, 'eval.json')}")


if __name__ == "__main__":
  run_main(main)
