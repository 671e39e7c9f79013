r"""Benchmark: the CROWN-IBP bound and its gradient w.r.t. the weights, with the convolution transpose's
custom kernel gradient (the default) against JAX's own derivation of it.

  python -m bench.conv_transpose [--nets cnn_small,dm_small,cnn7] [--batch 128]
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from bench.common import NETS, device_description, time_fn
from cbudget.bounds import Box, crown
from cbudget.bounds._src import conv_transpose
from cbudget.objective import margin_spec

FLAGS = flags.FLAGS
flags.DEFINE_list("nets", ["cnn_small", "dm_small"], "Nets to time (cnn7 takes minutes on a CPU).")
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("steps", 20, "Timed calls (median reported).")


def main(argv):
  del argv
  supports = conv_transpose.supports
  print(
    f"CROWN-IBP lower bound + gradient w.r.t. params, batch {FLAGS.batch}, on "
    f"{device_description()} (median ms)"
  )
  for name in FLAGS.nets:
    make_model, shape = NETS[name]
    model = make_model()
    x = jax.random.uniform(jax.random.key(0), (FLAGS.batch,) + shape)
    y = jnp.arange(FLAGS.batch) % 10
    variables = model.init(jax.random.key(1), x[:1])
    f = lambda v, z: model.apply(v, z, train=False)
    loss = lambda v: jnp.sum(
      jax.nn.softplus(
        -crown(f, need_upper=False)(v, Box.from_budget(x, 0.01), margin_spec(y, 10)).lower
      )
    )
    times = []
    for custom in (True, False):
      # The switch is read when the bound is traced: each jit below compiles its own version.
      conv_transpose.supports = supports if custom else (lambda params: False)
      times.append(1e3 * time_fn(jax.jit(jax.grad(loss)), variables, repeats=FLAGS.steps)[0])
    conv_transpose.supports = supports
    print(
      f"  {name:10s} custom kernel gradient {times[0]:9.2f}   JAX's derivation {times[1]:9.2f}"
      f"   ({times[1] / times[0]:.1f}x)",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
