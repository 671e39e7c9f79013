r"""Certify every model under every model's threat: the cross-evaluation matrix.

  python -m launch.cross_evaluate --workdirs uniform=W1,global=W2,contextual=W3 --out results/cross

Each model (row) is certified under each threat (column) on the same test examples: its own budgets,
uniform ε₀, uniform a·ε₀ (the smallest budget a learned model may give a pixel) and every other
model's budgets. Writes ``<out>.json`` and ``<out>.md``.
"""

import json
import os

from absl import flags

from launch.common import run_main

FLAGS = flags.FLAGS


def define_flags():
  """The launcher's flags (defined only when run, so that importing the module for its functions
  does not clash with other launchers' flags of the same names)."""
  from cbudget.attacks import ATTACKS

  flags.DEFINE_list("workdirs", None, "name=WORKDIR pairs, one per model.", required=True)
  flags.DEFINE_string("out", "results/cross", "Output path without extension (.json and .md).")
  flags.DEFINE_integer("num_examples", 1000, "Test examples (the same for every cell).")
  flags.DEFINE_list("methods", ["ibp", "crown-ibp"], "Certification methods.")
  flags.DEFINE_integer("batch_size", 100, "Evaluation batch size.")
  flags.DEFINE_enum(
    "attack",
    "strong",
    list(ATTACKS),
    "Attack of every cell: pgd, or the worst of PGD and APGD with margin and CE loss (the matrix "
    "compares certified errors; the attack only checks them).",
  )


def threats_for(models: dict[str, str]) -> dict[str, str]:
  """Column name -> threat spec: own, uniform ε₀ and a·ε₀, and each model's budgets."""
  from cbudget.train import config_from_dict
  from cbudget.workdir import read_config

  configs = {name: config_from_dict(read_config(w)) for name, w in models.items()}
  eps0 = {c.eps for c in configs.values()}
  if len(eps0) != 1:
    raise ValueError(f"the models have different target ε₀ {sorted(eps0)}: compare like with like")
  (eps0,) = eps0
  ratio_min = min(c.budget_range[0] for c in configs.values() if c.budget != "uniform")
  columns = {"own": "own", f"uniform {eps0:.4g}": f"uniform:{eps0}"}
  columns[f"uniform {ratio_min:g}·ε₀"] = f"uniform:{ratio_min * eps0}"
  columns.update({f"{name}'s budgets": f"budgets:{w}" for name, w in models.items()})
  return columns


def cross_evaluate(models: dict[str, str], **options) -> dict:
  """``{model: {column: evaluation}}`` (each :func:`cbudget.evaluate.evaluate`'s report)."""
  from cbudget.evaluate import evaluate

  columns = threats_for(models)
  return {
    name: {col: evaluate(w, threat=spec, **options) for col, spec in columns.items()}
    for name, w in models.items()
  }


def markdown(matrix: dict, method: str) -> str:
  """One table: certified error (%) of each model (row) under each threat (column)."""
  columns = list(next(iter(matrix.values())))
  lines = [
    f"Certified error (%, {method}; every cell on the same test examples)\n",
    "| model | " + " | ".join(columns) + " |",
    "|---|" + "---|" * len(columns),
  ]
  for name, row in matrix.items():
    cells = []
    for col in columns:
      common = row[col]["common"]
      err = common["certified_error_best" if method == "best" else "certified_error"]
      err = err if method == "best" else err[method]
      cells.append(f"{100 * err:.1f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from cbudget.workdir import atomic_write_text

  models = dict(item.split("=", 1) for item in FLAGS.workdirs)
  matrix = cross_evaluate(
    models,
    num_examples=FLAGS.num_examples,
    methods=tuple(FLAGS.methods),
    batch_size=FLAGS.batch_size,
    attack=FLAGS.attack,
  )
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  atomic_write_text(FLAGS.out + ".json", json.dumps(matrix, indent=2) + "\n")
  text = "\n".join(markdown(matrix, m) for m in [*FLAGS.methods, "best"])
  atomic_write_text(FLAGS.out + ".md", text)
  print(text)


if __name__ == "__main__":
  define_flags()
  run_main(main)
