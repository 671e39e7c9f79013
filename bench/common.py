"""Timing helpers shared by the benchmarks: median wall-clock after compilation, peak memory."""

import resource
import statistics
import time

import jax


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
  except Exception:   # not every backend reports it
    return None
  if analysis is None:
    return None
  return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
          analysis.output_size_in_bytes)


def max_rss_mib():
  """Peak resident memory of this process so far (Linux: KiB units)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_description():
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind} x{jax.device_count()}"
