r"""Benchmark: the CROWN-IBP bound and its gradient w.r.t. the weights, with the convolution transpose's
custom kernel gradient (the default) against JAX's own derivation of it; then the transpose of each
strided convolution of the nets alone, by phases (the default) against one dilated convolution.

  python -m bench.conv_transpose [--nets cnn_small,dm_small,cnn7] [--batch 128] [--rows 2600]
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
flags.DEFINE_integer("rows", 2600, "(Row, example) pairs of one transpose (a full-CROWN pass).")


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
  print(f"transpose of each strided convolution, {FLAGS.rows} rows (median ms)")
  for name in FLAGS.nets:
    make_model, shape = NETS[name]
    x = jnp.zeros((1,) + shape)
    jaxpr = jax.make_jaxpr(lambda z: make_model().init_with_output(jax.random.key(1), z)[0])(x)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    for i, eqn in enumerate(convs):
      params = eqn.params
      if all(s == 1 for s in params["window_strides"]) or not conv_transpose.supports(params):
        continue
      lhs, rhs = (v.aval for v in eqn.invars)
      spatial = [lhs.shape[d] for d in params["dimension_numbers"].lhs_spec[2:]]
      g = jax.random.normal(jax.random.key(2), (FLAGS.rows,) + eqn.outvars[0].aval.shape[1:])
      w = jax.random.normal(jax.random.key(3), rhs.shape)
      forms = (conv_transpose._transposed_conv_by_phases, conv_transpose._transposed_conv_dilated)
      ms = [
        1e3 * time_fn(jax.jit(lambda g, w, f=f: f(g, w, params, spatial)), g, w, repeats=5)[0]
        for f in forms
      ]
      print(
        f"  {name:10s} conv {i} {tuple(lhs.shape[1:])} stride {params['window_strides']}: "
        f"by phases {ms[0]:8.2f}   dilated {ms[1]:8.2f}   ({ms[1] / ms[0]:.1f}x)",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
