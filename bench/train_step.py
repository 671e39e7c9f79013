r"""Benchmark: certified training steps against a clean training step.

  python -m bench.train_step [--nets mlp,cnn_small,dm_small,cnn7] [--steps 20]

For each net: the median wall-clock (over --steps calls after compilation) of a clean step, an IBP
step, a CROWN-IBP step and one with loss fusion (SGD-style: loss, gradient, Adam update), with uniform boxes and with
contextual generators (``--generators``), with the bounds on the whole batch and on blocks of
examples (``--bound_blocks``), and the ratio of each to the clean step; XLA's planned
memory and floating-point operations per step (a measure of work that does not depend on the
machine's load); and the throughput of full-CROWN certification, with sparse and dense
intermediate bounds. mlp and cnn_small are the nets of the auto_LiRPA
reference numbers in the README (there: torch CPU, batch 128, 2 threads).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from bench.common import (
  NETS,
  compiled_flops,
  compiled_memory_bytes,
  device_description,
  device_peak_mib,
  time_fn,
)
from cbudget.bounds import Box, crown
from cbudget.objective import margin_spec
from cbudget.model import Variables
from cbudget.train import TrainConfig, init_state, make_setup, make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_list("nets", ["mlp", "cnn_small", "dm_small", "cnn7"], "Nets to time.")
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
flags.DEFINE_list(
  "methods",
  ["ibp", "crown-ibp", "crown-ibp fused"],
  "Certified training methods timed against the clean step (also: sabr, mtl-ibp).",
)
flags.DEFINE_list("budgets", ["uniform", "contextual"], "Budget modes.")
flags.DEFINE_list("generators", ["coarse", "small"], "Generators timed in contextual mode.")
flags.DEFINE_list(
  "bound_blocks",
  ["0", "32"],
  "Examples per block of the bounds (--bound_block: 0 the whole batch) timed for each method.",
)
flags.DEFINE_bool("train_steps", True, "Time the training steps.")
flags.DEFINE_bool("full_crown", True, "Also time full-CROWN certification.")
flags.DEFINE_integer("crown_batch", 16, "Batch for full-CROWN certification throughput.")
flags.DEFINE_list("crown_modes", ["sparse", "dense"], "Full-CROWN intermediate bounds timed.")


def clean_step_fn(setup):
  def loss_fn(params, batch_stats, x, y):
    logits, _, new_stats = setup.model.training_logits(Variables(params, batch_stats), x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

  @jax.jit
  def step(state, x, y):
    params, batch_stats = state.variables
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, params)
    variables = Variables(optax.apply_updates(params, updates), stats)
    return state._replace(variables=variables, opt_state=opt_state), loss

  return step


def bench_net(name):
  make_model, shape = NETS[name]
  x = jax.random.uniform(jax.random.key(0), (FLAGS.batch,) + shape)
  y = jnp.arange(FLAGS.batch) % 10
  print(f"\n{name} {shape} batch {FLAGS.batch} on {device_description()}  (median ms per step)")
  clean_ms = clean_flops = None
  runs = [(b, g) for b in FLAGS.budgets for g in (FLAGS.generators if b == "contextual" else [""])]
  runs = runs if FLAGS.train_steps else []
  blocks = [int(b) for b in FLAGS.bound_blocks]
  for budget, generator in runs:
    for method, block in [("clean", 0)] + [(m, b) for m in FLAGS.methods for b in blocks]:
      if method == "clean" and (budget, generator) != runs[0]:
        continue
      config = TrainConfig(
        workdir="unused",
        model="mlp",
        budget=budget,
        generator=generator or "coarse",
        method={"clean": "ibp", "crown-ibp fused": "crown-ibp"}.get(method, method),
        loss_fusion=method == "crown-ibp fused",
        eps=0.1,
        batch_size=FLAGS.batch,
        steps=1000,
        warmup_fraction=0.0,
        ramp_fraction=0.0,
        bound_block=block,
      )
      setup = make_setup(config, steps_per_epoch=1000)
      model = dataclasses.replace(setup.model, classifier=make_model(), num_classes=10)
      setup = dataclasses.replace(setup, model=model)
      state = init_state(setup, config, x[:1])
      step = clean_step_fn(setup) if method == "clean" else make_train_step(setup, config)
      seconds, _ = time_fn(lambda s: step(s, x, y), state, repeats=FLAGS.steps)
      mem = compiled_memory_bytes(step, state, x, y)
      flops = compiled_flops(step, state, x, y)
      ms = 1e3 * seconds
      if method == "clean":
        clean_ms, clean_flops = ms, flops
      label = "clean" if method == "clean" else f"{method}, {budget} {generator}".strip()
      label += f", block {block}" if block and method != "clean" else ""
      ratio = f"{ms / clean_ms:5.1f}x" if clean_ms else ""
      mem_s = f"   XLA plan {mem / 2**20:7.1f} MiB" if mem else ""
      flops_s = ""
      if flops and clean_flops:
        flops_s = f"   XLA {flops / 1e9:7.2f} GFLOP ({flops / clean_flops:5.1f}x)"
      print(f"  {label:38s} {ms:9.2f} ms  {ratio}{mem_s}{flops_s}", flush=True)
  if FLAGS.full_crown:
    model = make_model()
    xb, yb = x[: FLAGS.crown_batch], y[: FLAGS.crown_batch]
    variables = model.init(jax.random.key(1), xb[:1])
    f = lambda v, z: model.apply(v, z, train=False)
    for mode in FLAGS.crown_modes:
      bound = crown(f, "crown", chunk_size=4096, need_upper=False, sparse=mode == "sparse")
      certify = jax.jit(lambda v: bound(v, Box.from_budget(xb, 0.01), margin_spec(yb, 10)).lower)
      seconds, _ = time_fn(certify, variables, repeats=2, warmup=1)
      peak = device_peak_mib()
      peak_s = "" if peak is None else f", device peak so far {peak:.0f} MiB"
      print(
        f"  {'full CROWN, ' + mode:28s} {FLAGS.crown_batch / seconds:9.2f} images/s "
        f"(batch {FLAGS.crown_batch}, chunk_size 4096{peak_s})",
        flush=True,
      )


def main(argv):
  del argv
  for name in FLAGS.nets:
    bench_net(name)


if __name__ == "__main__":
  app.run(main)
