"""α-CROWN vs full CROWN on a trained run: certified error and seconds (CPU or accelerator).

  python -m bench.alpha_crown_mnist --workdir W [--num_examples 200] [--batch 25] [--iterations 20]

Certifies each test example at the budgets the run's model proposes (uniform: ε₀ everywhere).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cbudget.bounds import Box, alpha_crown, crown
from bench.common import trained_run_and_test_images
from cbudget.evaluate import DEFAULT_CROWN_MEMORY_GIB
from cbudget.objective import margin_spec

MEM = int(
  DEFAULT_CROWN_MEMORY_GIB * 2**30
)  # bytes for one full-CROWN backward pass, as launch.evaluate


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_examples", type=int, default=200)
  parser.add_argument("--batch", type=int, default=25)
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--optimize_intermediate", type=int, default=1)
  args = parser.parse_args()
  config, model, variables, images, labels = trained_run_and_test_images(
    args.workdir, args.num_examples
  )
  logits_fn = model.logits
  budgets_of = jax.jit(lambda x: model.budgets(variables.params, x, config.eps))

  methods = {
    "crown": jax.jit(
      lambda v, b, s: crown(logits_fn, "crown", need_upper=False, memory_limit=MEM)(v, b, s).lower
    ),
    "alpha-crown": jax.jit(
      lambda v, b, s: (
        alpha_crown(
          logits_fn,
          args.iterations,
          args.lr,
          need_upper=False,
          memory_limit=MEM,
          optimize_intermediate=bool(args.optimize_intermediate),
        )(v, b, s).lower
      )
    ),
  }
  certified = {m: [] for m in methods}
  seconds = {m: 0.0 for m in methods}
  margins = {m: [] for m in methods}
  clean = []
  for start in range(0, args.num_examples, args.batch):
    x = images[start : start + args.batch]
    y = labels[start : start + args.batch]
    box = Box.from_budget(x, budgets_of(x))
    spec = margin_spec(y, model.num_classes, x.dtype)
    clean.append(np.asarray(jnp.argmax(logits_fn(variables, x), -1) == y))
    for m, f in methods.items():
      t = time.time()
      lower = jax.block_until_ready(f(variables, box, spec))
      seconds[m] += time.time() - t
      certified[m].append(np.asarray(jnp.all(lower > 0, axis=1)))
      margins[m].append(np.asarray(lower.min(axis=1)))
    print(
      start, {m: int(np.concatenate(c).sum()) for m, c in certified.items()}, seconds, flush=True
    )
  cert = {m: np.concatenate(c) for m, c in certified.items()}
  marg = {m: np.concatenate(c) for m, c in margins.items()}
  gain = marg["alpha-crown"] - marg["crown"]
  result = {
    "workdir": args.workdir,
    "budget_mode": config.budget,
    "eps": config.eps,
    "num_examples": int(len(cert["crown"])),
    "clean_error": float(1 - np.concatenate(clean).mean()),
    "certified_error": {m: float(1 - c.mean()) for m, c in cert.items()},
    "seconds_incl_compile": seconds,
    "iterations": args.iterations,
    "lr": args.lr,
    "optimize_intermediate": bool(args.optimize_intermediate),
    "min_margin_gain_median": float(np.median(gain)),
    "min_margin_gain_min": float(gain.min()),
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
