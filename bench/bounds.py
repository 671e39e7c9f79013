r"""Benchmark: IBP, CROWN-IBP and CROWN bounds against a plain forward pass.

  python -m bench.bounds [--batch 128] [--repeats 10] [--nets cnn_small,cnn7]

Prints the median milliseconds per call (after compilation) of: the forward pass; each bound
method forward only; each with the gradient w.r.t. params and ε (what training needs); and their
ratio to the forward pass. Bounds are of the margin spec (K-1 rows per example, as in training),
lower bound only for CROWN methods. Full CROWN on the CNN-7-sized net is run at --crown_batch
examples with --chunk_size rows per backward pass (it computes CROWN bounds for every neuron).
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from bench.common import compiled_memory_bytes, device_description, time_fn
from cbudget.bounds import Box, crown, ibp
from cbudget.models import classifiers
from cbudget.objective import margin_spec

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (median reported).")
flags.DEFINE_list("nets", ["cnn_small", "cnn7"], "Which nets.")
flags.DEFINE_integer("crown_batch", 2, "Batch for full CROWN on cnn7 (it is per-neuron work).")
flags.DEFINE_integer("chunk_size", 4096, "Rows per full-CROWN backward pass on cnn7.")


def nets():
  # cnn_small: the auto_LiRPA reference net (conv 16 4x4 s2 p1, conv 32 4x4 s2 p1, dense 100, 10).
  small = classifiers.PlainCNN(
    10, convs=((16, 4, 2), (32, 4, 2)), dense=(100,), padding=((1, 1), (1, 1))
  )
  return {
    "cnn_small": (small, (28, 28, 1)),
    "cnn7": (classifiers.get_classifier("cnn7", 10), (32, 32, 3)),
  }


def bench_net(name, model, shape, batch):
  x = jax.random.uniform(jax.random.key(0), (batch,) + shape)
  y = jnp.arange(batch) % 10
  variables = model.init(jax.random.key(1), x[:1])
  f = lambda v, z: model.apply(v, z, train=False)
  spec = margin_spec(y, 10)
  eps = jnp.full(x.shape, 2 / 255)
  methods = {
    "ibp": lambda v, e: ibp(f)(v, Box.from_budget(x, e), spec).lower,
    "crown-ibp": lambda v, e: crown(f, need_upper=False)(v, Box.from_budget(x, e), spec).lower,
  }
  forward = jax.jit(lambda v: f(v, x))
  t_fwd, _ = time_fn(forward, variables, repeats=FLAGS.repeats)
  fwd_grad = jax.jit(jax.grad(lambda v: f(v, x).sum()))
  t_fwd_grad, _ = time_fn(fwd_grad, variables, repeats=FLAGS.repeats)
  print(f"\n{name} {shape} batch {batch} on {device_description()}")
  print(f"  {'forward':28s} {1e3 * t_fwd:9.2f} ms   1.0x")
  print(f"  {'forward + grad':28s} {1e3 * t_fwd_grad:9.2f} ms   {t_fwd_grad / t_fwd:5.1f}x")
  for m, fn in methods.items():
    jf = jax.jit(fn)
    t, _ = time_fn(jf, variables, eps, repeats=FLAGS.repeats)
    jg = jax.jit(jax.grad(lambda v, e: fn(v, e).sum(), argnums=(0, 1)))
    tg, _ = time_fn(jg, variables, eps, repeats=FLAGS.repeats)
    mem = compiled_memory_bytes(jg, variables, eps)
    mem_s = f"  (XLA plan {mem / 2**20:.0f} MiB)" if mem else ""
    print(f"  {m:28s} {1e3 * t:9.2f} ms  {t / t_fwd:5.1f}x")
    print(f"  {m + ' + grad':28s} {1e3 * tg:9.2f} ms  {tg / t_fwd:5.1f}x{mem_s}")
  crown_batch = batch if name != "cnn7" else FLAGS.crown_batch
  chunk = None if name != "cnn7" else FLAGS.chunk_size
  xb, specb = x[:crown_batch], spec[:crown_batch]
  full = jax.jit(
    lambda v, e: (
      crown(f, "crown", chunk_size=chunk, need_upper=False)(v, Box.from_budget(xb, e), specb).lower
    )
  )
  t, _ = time_fn(full, variables, eps[:crown_batch], repeats=max(1, FLAGS.repeats // 5), warmup=1)
  print(
    f"  {f'crown (full), batch {crown_batch}':28s} {1e3 * t:9.2f} ms  "
    f"({crown_batch / t:.2f} images/s)"
  )


def main(argv):
  del argv
  for name in FLAGS.nets:
    model, shape = nets()[name]
    bench_net(name, model, shape, FLAGS.batch)


if __name__ == "__main__":
  app.run(main)
