"""Shared test set-up: one compilation cache for the session, tiny run configs, one trained run.

The end-to-end tests train and evaluate the same small models many times, in this process and in
launcher subprocesses; a persistent compilation cache in a fresh temporary folder (removed at the
end) lets every repeat of a compilation be a cache hit. Tests that only read a finished run share
:func:`trained_run`, trained once per test run: by the first pytest-xdist worker that asks, into
a folder every worker shares, while the others wait on a file lock.
"""

import atexit
import fcntl
import os
import shutil
import tempfile

# XLA:CPU's legacy loop emitters instead of its MLIR fusion emitters: compilation, three quarters
# of the suite's time, takes ~40 % less, and the compiled code runs as fast (bench/README.md).
# Set before JAX starts its backend; the launcher subprocesses inherit it.
CPU_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if CPU_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_COMPILE_FLAGS).strip()

import jax
import pytest

# pytest-xdist's workers (the README's command runs three) inherit the controller's environment, so
# they share its cache: what one worker compiled, the others load. The controller creates and
# removes it. No size limit: a limit turns on JAX's eviction, which scans the whole folder on every
# write (quadratic over a test session). An entry read while another worker writes it fails to
# decompress, and JAX then compiles instead (a warning, never a wrong executable).
_CACHE = os.environ.get("CBUDGET_TEST_JAX_CACHE")
if _CACHE is None:
  _CACHE = tempfile.mkdtemp(prefix="cbudget-test-jax-cache-")
  os.environ["CBUDGET_TEST_JAX_CACHE"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Runs shared by the workers (the same life as the cache).
_SHARED = os.environ.get("CBUDGET_TEST_SHARED")
if _SHARED is None:
  _SHARED = tempfile.mkdtemp(prefix="cbudget-test-shared-")
  os.environ["CBUDGET_TEST_SHARED"] = _SHARED
  atexit.register(shutil.rmtree, _SHARED, ignore_errors=True)
# The launchers run as subprocesses inherit these; this process sets them directly.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

TINY = dict(
  dataset="shapes",
  model="dm_small",
  num_train_examples=256,
  batch_size=32,
  log_every=2,
  checkpoint_every=4,
  eps=0.1,
  warmup_fraction=0.0,
  ramp_fraction=0.5,
)


def tiny_config(path, **overrides):
  """A :class:`cbudget.train.TrainConfig` of a few-second run in ``path``."""
  from cbudget.train import TrainConfig

  return TrainConfig(workdir=str(path), **{**TINY, **overrides})


@pytest.fixture(scope="session")
def trained_run():
  """A contextual run trained long enough to certify some examples (tests only read it; a test
  that writes into a run copies it first)."""
  from cbudget.train import train

  folder = os.path.join(_SHARED, "trained")
  os.makedirs(folder, exist_ok=True)
  config = tiny_config(
    os.path.join(folder, "run"),
    steps=300,
    num_train_examples=1024,
    batch_size=64,
    checkpoint_every=300,
    log_every=100,
    warmup_fraction=0.1,
  )
  with open(os.path.join(folder, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    done = os.path.join(folder, "done")
    if not os.path.exists(done):
      train(config)
      open(done, "w").close()
  return config
