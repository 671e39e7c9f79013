r"""The largest certified box around test images of a trained run, and a picture of it.

  python -m launch.certify_box --workdir workdir/demo --num_examples 16

Writes ``certified_boxes.json`` (per example: the certified uniform ε, the equivalent ε of the
optimised non-uniform box, their ratio, the domain-clipped ("effective") versions, and the budget
the run's generator proposes) and ``certified_boxes.png`` (per example: the input, the certified
budget map, and the uniform radius for comparison) in the workdir.
"""

import json
import os

from absl import flags

from launch.common import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The --workdir of a training run.", required=True)
flags.DEFINE_integer("num_examples", 16, "The first N test examples.")
flags.DEFINE_enum(
  "method", "crown", ["ibp", "crown-ibp", "crown", "alpha-crown"], "Certify with this method."
)
flags.DEFINE_integer("bisection_steps", 12, "Halvings for the uniform ε.")
flags.DEFINE_integer("optimize_steps", 40, "Gradient steps on the log-budgets' shape.")
flags.DEFINE_integer("scale_steps", 10, "Halvings of the non-uniform box's global scale.")
flags.DEFINE_float(
  "crown_memory_gib",
  None,
  "Memory for one full-CROWN backward pass; default cbudget.evaluate.DEFAULT_CROWN_MEMORY_GIB.",
)
flags.DEFINE_integer("plot_examples", 8, "Examples in the picture.")
flags.register_validator("num_examples", lambda v: v >= 1, "--num_examples must be >= 1")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cbudget import certify
  from cbudget.evaluate import load_run, load_test_set
  from cbudget.workdir import atomic_write_text

  config, setup, state = load_run(FLAGS.workdir)
  test = load_test_set(config, FLAGS.num_examples)
  x, y = jnp.asarray(test.images), jnp.asarray(test.labels)
  model, variables = setup.model, state.variables
  logits_fn = model.logits  # (variables, x) -> logits; the budget generator's params are unused
  proposed = jnp.broadcast_to(model.budgets(variables.params, x, config.eps), x.shape)
  options = {}
  if FLAGS.method in ("crown", "alpha-crown"):
    from cbudget.evaluate import DEFAULT_CROWN_MEMORY_GIB

    options["memory_limit"] = int((FLAGS.crown_memory_gib or DEFAULT_CROWN_MEMORY_GIB) * 2**30)
  result = certify.largest_certified_box(
    logits_fn,
    variables,
    x,
    y,
    method=FLAGS.method,
    bisection_steps=FLAGS.bisection_steps,
    optimize_steps=FLAGS.optimize_steps,
    scale_steps=FLAGS.scale_steps,
    method_options=options,
  )
  summary = {
    "workdir": FLAGS.workdir,
    "method": FLAGS.method,
    "budget_mode": config.budget,
    "eps": config.eps,
    **certify.summary(result, proposed),
  }
  result = jax.tree.map(np.asarray, result)
  proposed_equiv = summary["per_example"]["proposed_equivalent_eps"]
  path = os.path.join(FLAGS.workdir, "certified_boxes.json")
  atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
  print(
    f"{summary['certified']}/{summary['num_examples']} certified ({FLAGS.method}); median uniform ε "
    f"{summary['median_uniform_eps']:.4g}, median equivalent ε {summary['median_equivalent_eps']:.4g}"
    f", median ratio {summary['median_ratio']}, effective {summary['median_effective_ratio']}; "
    f"the generator proposes a median equivalent ε of {summary['median_proposed_equivalent_eps']:.4g}"
  )
  print(f"  wrote {path}")
  png = os.path.join(FLAGS.workdir, "certified_boxes.png")
  _plot(np.asarray(x), result, proposed_equiv, png, FLAGS.plot_examples)
  print(f"  wrote {png}")


def _plot(x, result, proposed_equiv, path, count):
  """Rows: the input, the certified budget map (per pixel, max over channels), and the map of the
  uniform radius on the same colour scale."""
  import matplotlib

  matplotlib.use("Agg")
  import numpy as np
  from matplotlib.figure import Figure

  count = min(count, len(x))
  fig = Figure(figsize=(2.2 * count, 6.6))
  axes = fig.subplots(3, count, squeeze=False)
  for j in range(count):
    img = x[j]
    budget = result.eps[j].max(axis=-1) if img.ndim == 3 else result.eps[j]
    vmax = max(float(budget.max()), float(result.uniform_eps[j]), 1e-12)
    shown = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    axes[0, j].imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
    axes[0, j].set_title(f"certified: {bool(result.certified[j])}", fontsize=8)
    im = axes[1, j].imshow(budget, cmap="viridis", vmin=0, vmax=vmax)
    axes[1, j].set_title(f"box: equiv ε {result.equivalent_eps[j]:.3g}", fontsize=8)
    axes[2, j].imshow(
      np.full(budget.shape, result.uniform_eps[j]), cmap="viridis", vmin=0, vmax=vmax
    )
    axes[2, j].set_title(
      f"uniform ε {result.uniform_eps[j]:.3g}\nmodel's ε {proposed_equiv[j]:.3g}", fontsize=8
    )
    fig.colorbar(im, ax=[axes[1, j], axes[2, j]], shrink=0.6)
    for a in axes[:, j]:
      a.set_xticks([])
      a.set_yticks([])
  fig.savefig(path, dpi=100)


if __name__ == "__main__":
  run_main(main)
