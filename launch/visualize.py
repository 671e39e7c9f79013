r"""Pictures of a training run: learned budgets and training curves.

  python -m launch.visualize --workdir workdir/demo [--num_examples 8]

writes ``budgets_grid.png`` (test images, their budget maps on one colour scale, overlays, and the
relevance mask where the dataset has one) and ``curves.png`` (errors and ε₀ against steps) in the
workdir (the plotting lives in ``cbudget.plots``).
"""

import os

import numpy as np
from absl import flags

from launch.common import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The --workdir of a training run.", required=True)
flags.DEFINE_integer("num_examples", 8, "How many test images to show.")
flags.register_validator("num_examples", lambda v: v > 0, "--num_examples must be > 0")


def main(argv):
  """Pictures of a run: budgets of the first test images, and the training curves."""
  del argv
  import jax.numpy as jnp

  from cbudget import data, plots
  from cbudget.evaluate import load_run

  run = load_run(FLAGS.workdir)
  config, model, variables = run.config, run.setup.model, run.state.variables
  test = data.load(
    config.dataset, "test", config.data_dir, seed=config.seed, num_examples=FLAGS.num_examples
  )
  x = jnp.asarray(test.images)
  eps = model.budgets(variables.params, x, config.eps)
  preds = np.asarray(jnp.argmax(model.logits(variables, x), -1))
  grid = plots.plot_budget_grid(
    test.images,
    np.asarray(eps),
    os.path.join(FLAGS.workdir, "budgets_grid.png"),
    masks=test.masks,
    labels=test.labels,
    preds=preds,
    max_examples=FLAGS.num_examples,
    title=f"{config.budget} budgets, ε₀ = {config.eps:.3g}",
  )
  print(f"wrote {grid}")
  metrics_path = os.path.join(FLAGS.workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    curves = plots.plot_training_curves(metrics_path, os.path.join(FLAGS.workdir, "curves.png"))
    print(f"wrote {curves}")


if __name__ == "__main__":
  run_main(main)
