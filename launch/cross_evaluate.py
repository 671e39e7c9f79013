r"""Certify every model under every model's threat: the cross-evaluation matrix.

  python -m launch.cross_evaluate --workdirs uniform=W1,global=W2,contextual=W3 --out results/cross

Each model (row) is certified under each threat (column) on the same test examples: its own budgets,
uniform ε₀, uniform a·ε₀ (the smallest budget a learned model may give a pixel) and every other
model's budgets. Writes ``<out>.json`` and ``<out>.md``.

  python -m launch.cross_evaluate --combine results/cross_s0.json,results/cross_s1.json \
      --out results/cross

combines matrices written earlier (one per seed, say) into one table of mean ± std per cell.
"""

import json
import os

from absl import flags

from launch.common import mean_std, run_main

FLAGS = flags.FLAGS


def define_flags():
  """The launcher's flags (defined only when run, so that importing the module for its functions
  does not clash with other launchers' flags of the same names)."""
  from cbudget.attacks import ATTACKS

  flags.DEFINE_list("workdirs", None, "name=WORKDIR pairs, one per model.")
  flags.DEFINE_list(
    "combine",
    [],
    "Instead of evaluating: matrices (.json) written before, one table of mean ± std.",
  )
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


def markdown(matrices: list[dict], method: str) -> str:
  """One table: certified error (%) of each model (row) under each threat (column); given several
  matrices (one per seed), each cell is their mean ± std."""
  first = matrices[0]
  columns = list(next(iter(first.values())))
  for other in matrices[1:]:
    if list(other) != list(first) or list(next(iter(other.values()))) != columns:
      raise ValueError("the matrices to combine have different models or threats")
  seeds = f"; mean ± std over {len(matrices)} matrices" if len(matrices) > 1 else ""
  lines = [
    f"Certified error (%, {method}; every cell on the same test examples{seeds})\n",
    "| model | " + " | ".join(columns) + " |",
    "|---|" + "---|" * len(columns),
  ]

  def error(evaluation):
    common = evaluation["common"]
    if method == "best":
      return common["certified_error_best"]
    return common["certified_error"][method]

  for name in first:
    cells = [mean_std([error(m[name][col]) for m in matrices]) for col in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from cbudget.workdir import atomic_write_text

  if bool(FLAGS.workdirs) == bool(FLAGS.combine):
    raise ValueError("give either --workdirs (evaluate) or --combine (tables written before)")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  if FLAGS.combine:
    matrices = []
    for path in FLAGS.combine:
      with open(path) as f:
        matrices.append(json.load(f))
    methods = [m for m in FLAGS.methods if all(m in _methods_of(x) for x in matrices)]
  else:
    models = dict(item.split("=", 1) for item in FLAGS.workdirs)
    matrix = cross_evaluate(
      models,
      num_examples=FLAGS.num_examples,
      methods=tuple(FLAGS.methods),
      batch_size=FLAGS.batch_size,
      attack=FLAGS.attack,
    )
    atomic_write_text(FLAGS.out + ".json", json.dumps(matrix, indent=2) + "\n")
    matrices, methods = [matrix], FLAGS.methods
  text = "\n".join(markdown(matrices, m) for m in [*methods, "best"])
  atomic_write_text(FLAGS.out + ".md", text)
  print(text)


def _methods_of(matrix: dict) -> list[str]:
  row = next(iter(matrix.values()))
  return list(next(iter(row.values()))["common"]["certified_error"])


if __name__ == "__main__":
  define_flags()
  run_main(main)
