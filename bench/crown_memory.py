r"""Benchmark: planned memory of full CROWN on CNN-7 (CIFAR shape) against the chunk size.

  python -m bench.crown_memory [--batch 32] [--chunk_sizes 2048,4096,8192]

Full CROWN computes a bound for every neuron of every layer, so its memory grows with the number of
rows carried through one backward pass. This compiles (without running: a CPU run of CNN-7 full
CROWN takes hours) and prints XLA's planned peak memory (arguments + outputs + temporaries) for each
chunk size, next to the 24 GiB of the project's machines.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from cbudget.bounds import Box, crown
from cbudget.models import classifiers
from cbudget.objective import margin_spec
from bench.common import compiled_memory_bytes, device_description

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_list(
  "chunk_sizes", ["2048", "4096", "8192"], "(Row, example) pairs per backward pass ('none': all)."
)


def main(argv):
  del argv
  model = classifiers.get_classifier("cnn7", 10)
  x = jax.random.uniform(jax.random.key(0), (FLAGS.batch, 32, 32, 3))
  y = jnp.arange(FLAGS.batch) % 10
  variables = model.init(jax.random.key(1), x[:1])
  f = lambda v, z: model.apply(v, z, train=False)
  print(f"full CROWN, cnn7, batch {FLAGS.batch}, on {device_description()}")
  for c in FLAGS.chunk_sizes:
    chunk = None if c == "none" else int(c)
    bound = jax.jit(
      lambda v: (
        crown(f, "crown", chunk_size=chunk, need_upper=False)(
          v, Box.from_budget(x, 2 / 255), margin_spec(y, 10)
        ).lower
      )
    )
    mem = compiled_memory_bytes(bound, variables)
    shown = "n/a" if mem is None else f"{mem / 2**30:8.2f} GiB"
    print(f"  chunk_size {c:>6}: planned peak {shown}", flush=True)


if __name__ == "__main__":
  app.run(main)
