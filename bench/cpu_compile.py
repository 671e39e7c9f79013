r"""XLA:CPU compile and run time with and without a compiler flag, in alternating subprocesses.

  python -m bench.cpu_compile                      # --xla_cpu_use_fusion_emitters=false
  python -m bench.cpu_compile --flag=--xla_backend_optimization_level=0 --repeats 3

Each subprocess (a fresh XLA, so nothing is cached between them) compiles and runs a CROWN-IBP
training step of DM-small (contextual budgets, batch 64) and a full-CROWN bound of the same
classifier on 16 examples, and reports compile time (the first call) and run time (best of three).
Runs alternate between the default flags and ``--flag`` so that drift on a shared machine hits both;
the last lines give the medians and their ratios.
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("flag", "--xla_cpu_use_fusion_emitters=false", "The XLA flag to compare.")
flags.DEFINE_integer("repeats", 2, "Subprocesses per setting.")

CHILD = r"""
import json, time
import jax, jax.numpy as jnp
from cbudget import data
from cbudget.bounds import Box, crown
from cbudget.train import TrainConfig, init_state, make_setup, make_train_step

config = TrainConfig(workdir="unused", dataset="shapes", model="dm_small", method="crown-ibp",
                     budget="contextual", batch_size=64, steps=10, warmup_fraction=0.0,
                     ramp_fraction=0.0)
ds = data.load("shapes", "train", num_examples=64)
x, y = jnp.asarray(ds.images), jnp.asarray(ds.labels)
setup = make_setup(config, steps_per_epoch=1)
state, step = init_state(setup, config), make_train_step(setup, config)

def timed(fn, *args):
  t0 = time.perf_counter(); out = fn(*args); jax.block_until_ready(out)
  first = time.perf_counter() - t0
  runs = []
  for _ in range(3):
    t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); runs.append(time.perf_counter() - t0)
  return first - min(runs), min(runs)

step_compile, step_run = timed(step, state, x, y)
model, variables = setup.model, state.variables
classifier = lambda p, x: model.logits(variables._replace(params=p), x)
box = Box.from_budget(x[:16], jnp.full(x[:16].shape, 0.05))
crown_compile, crown_run = timed(jax.jit(crown(classifier, "crown")), variables.params, box)
print(json.dumps(dict(step_compile=step_compile, step_run=step_run, crown_compile=crown_compile,
                      crown_run=crown_run)))
"""


def run_child(xla_flags: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  base = os.environ.get("XLA_FLAGS", "")
  settings = {"default": base, FLAGS.flag: f"{base} {FLAGS.flag}".strip()}
  results = {name: [] for name in settings}
  for i in range(FLAGS.repeats):
    for name, xla_flags in settings.items():
      r = run_child(xla_flags)
      results[name].append(r)
      cells = "  ".join(f"{k} {v:7.3f} s" for k, v in r.items())
      print(f"run {i} {name:40s} {cells}", flush=True)
  medians = {
    n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()
  }
  for name, m in medians.items():
    print(f"median {name:37s} " + "  ".join(f"{k} {v:7.3f} s" for k, v in m.items()))
  ratio = {k: medians[FLAGS.flag][k] / medians["default"][k] for k in medians["default"]}
  print("ratio flag/default       " + "  ".join(f"{k} {v:5.2f}" for k, v in ratio.items()))


if __name__ == "__main__":
  app.run(main)
