"""A run's workdir: ``config.json``, checkpoints and the metrics log. Written so nothing is lost.

* Checkpoints use orbax, which writes each step to a temporary directory and renames it when
  complete, so a crash mid-write leaves the previous checkpoint as the latest valid one.
* ``config.json`` (and ``eval.json``) are written through a temporary file and ``os.replace``
  (atomic on POSIX), readable by all (0644) like any other file a run writes.
* ``metrics.jsonl`` is append-only, one JSON object per line, flushed and fsynced per line. On
  resume, lines past the restored step and any half-written last line are dropped (by an atomic
  rewrite), so the file continues from the checkpoint without duplicates.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp


FILE_MODE = 0o644


def atomic_write_text(path: str, text: str):
  """Write ``path`` whole or not at all (a temporary file renamed over it), mode 0644."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fchmod(f.fileno(), FILE_MODE)  # mkstemp creates 0600
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _jsonable(value):
  if isinstance(value, tuple):
    return list(value)
  return value


def check_or_write_config(
  workdir: str, config: dict, identity: Sequence[str], defaults: Mapping[str, Any] | None = None
):
  """Write ``config.json``; if one exists, the fields in ``identity`` must match it.

  A workdir holding a run of a different model (or dataset, budget mode, ...) is an error, rather
  than a silent restore of incompatible parameters. A field missing from an existing
  ``config.json`` (written before the field was added) reads as its value in ``defaults``, the
  value every run had before.
  """
  path = os.path.join(workdir, "config.json")
  config = {k: _jsonable(v) for k, v in config.items()}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    old = {**{k: _jsonable(v) for k, v in (defaults or {}).items()}, **old}
    diffs = [k for k in identity if old.get(k) != config.get(k)]
    if diffs:
      detail = ", ".join(f"--{k}={old.get(k)!r} there vs {config.get(k)!r} now" for k in diffs)
      raise ValueError(
        f"workdir {workdir} holds a run with different settings ({detail}); use "
        "another --workdir, or the same flags to resume that run"
      )
  atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {workdir}: is it the --workdir of a training run?")
  with open(path) as f:
    return json.load(f)


class Manager:
  """Orbax checkpoints of a pytree in ``workdir/checkpoints`` (synchronous, atomic, last 2 kept)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state):
    if step in self._manager.all_steps():
      return
    self._manager.save(int(step), args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()

  def latest_step(self):
    return self._manager.latest_step()

  def restore_latest(self, like):
    """The latest complete checkpoint, restored into the structure of ``like``; None if none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self):
    self._manager.close()


class MetricsLog:
  """``metrics.jsonl`` (append-only, resumable) plus TensorBoard scalars in ``workdir/tb``."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._truncate_after(resume_step)
    self._file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # TensorBoard output is optional; the JSON lines are the record.
      self._tb = None

  def _truncate_after(self, step: int):
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a half-written line from a killed run
        if isinstance(record, dict) and record.get("step", 0) <= step:
          kept.append(json.dumps(record) + "\n")
    atomic_write_text(self.path, "".join(kept))

  def write(self, record: dict):
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._tb is not None:
      for k, v in record.items():
        # NaN marks a metric the step's phase does not compute (no bound in the clean warm-up):
        # nothing to plot, and tensorboardX warns on every one.
        if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, record["step"])
      self._tb.flush()

  def close(self):
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a JSON-lines file, skipping blank and half-written lines (a training job
  may be writing the last line while we read); [] if the file does not exist."""
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(record, dict):
          records.append(record)
  return records


def read_metrics(workdir: str) -> list[dict]:
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))
