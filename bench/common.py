"""What the benchmarks share: the benchmarked nets, median wall-clock after compilation, memory."""

import resource
import statistics
import time

import jax

from cbudget.models import classifiers

# The benchmarked nets: name -> (classifier constructor, input shape of one example). mlp and
# cnn_small are the nets of the auto_LiRPA reference numbers in the README.
NETS = {
  "mlp": (lambda: classifiers.MLP(10, hidden=(256, 256)), (28, 28, 1)),
  "cnn_small": (
    lambda: classifiers.PlainCNN(
      10, convs=((16, 4, 2), (32, 4, 2)), dense=(100,), padding=((1, 1), (1, 1))
    ),
    (28, 28, 1),
  ),
  "dm_small": (lambda: classifiers.get_classifier("dm_small", 10), (28, 28, 1)),
  "cnn7": (lambda: classifiers.get_classifier("cnn7", 10), (32, 32, 3)),
}


def time_fn(fn, *args, repeats: int = 20, warmup: int = 2):
  """Median and min seconds per call of a jitted ``fn`` (compiled and warmed up first)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), min(times)


def compiled_memory_bytes(jitted, *args):
  """Peak temporary + argument + output bytes XLA plans for one call (None if unavailable)."""
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
  except Exception:  # not every backend reports it
    return None
  if analysis is None:
    return None
  return (
    analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
  )


def compiled_flops(jitted, *args):
  """XLA's count of floating-point operations for one call (None if unavailable): a measure of
  work that, unlike wall-clock time, does not depend on what else the machine runs."""
  try:
    analysis = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # not every backend reports it
    return None
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else None
  return None if not analysis else analysis.get("flops")


def max_rss_mib():
  """Peak resident memory of this process so far (Linux: KiB units)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_description():
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind} x{jax.device_count()}"


def device_peak_mib():
  """Peak memory the first device has held so far, from its allocator (None where the backend does
  not report it, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def trained_run_and_test_images(workdir: str, num_examples: int):
  """``(config, model, variables, images, labels)``: a trained run (``cbudget.evaluate.load_run``)
  and its first ``num_examples`` test images and labels, as arrays."""
  from cbudget.evaluate import load_run, load_test_set

  config, setup, state = load_run(workdir)
  test = load_test_set(config, num_examples)
  images, labels = jax.numpy.asarray(test.images), jax.numpy.asarray(test.labels)
  return config, setup.model, state.variables, images, labels
