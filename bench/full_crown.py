"""Full-CROWN certification rate on a trained run, after compilation.

  python -m bench.full_crown --workdir W [--num_examples 100] [--memory_gib 2] [--repeats 2]

Certifies the first ``num_examples`` test images as one batch at the run's ε₀ (uniform runs;
learned budgets use the run's generator), with ``memory_limit`` as ``launch.evaluate`` sets it, and
prints XLA's planned temporary memory, seconds per pass and images per second (compilation
excluded), and the certified fraction (to check that a faster variant certifies the same).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from bench.common import device_description, trained_run_and_test_images
from cbudget.bounds import crown
from cbudget.objective import margin_spec


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_examples", type=int, default=100)
  parser.add_argument("--memory_gib", type=float, default=2.0)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  config, model, run_variables, x, labels = trained_run_and_test_images(
    args.workdir, args.num_examples
  )
  variables = model.classifier_variables(run_variables)
  box = model.box(x, model.budgets(run_variables.params, x, config.eps))
  spec = margin_spec(labels, model.num_classes)
  memory = int(args.memory_gib * 2**30)
  bound = crown(model._apply, "crown", need_upper=False, memory_limit=memory)
  compiled = jax.jit(lambda v, b, s: bound(v, b, s).lower).lower(variables, box, spec).compile()
  planned = compiled.memory_analysis()
  print(f"full CROWN, {config.model}, {args.num_examples} images, on {device_description()}")
  if planned is not None:
    print(f"  planned temporaries {planned.temp_size_in_bytes / 2**30:.2f} GiB")
  for _ in range(args.repeats):
    start = time.perf_counter()
    lower = jax.block_until_ready(compiled(variables, box, spec))
    seconds = time.perf_counter() - start
    certified = float(jnp.mean(jnp.all(lower > 0, axis=1)))
    print(
      f"  {seconds:.2f} s, {args.num_examples / seconds:.2f} images/s, certified {certified:.3f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
