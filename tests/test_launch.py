"""The launchers as a user meets them: bad flags and files give one-line errors; kills lose nothing."""

import os
import shutil
import signal
import subprocess
import sys
import time

import json
import stat

import chex
import jax
import pytest

from cbudget import workdir
from cbudget.evaluate import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
SMALL = ["--num_train_examples=128", "--batch_size=32", "--log_every=2", "--eps=0.1"]


def run(module, *args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    env=ENV,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def assert_clear_error(out, pattern):
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  assert pattern in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(
  "flag,message",
  [
    ("--eps=-0.1", "--eps must be > 0"),
    ("--dataset=imagenet", "value should be one of"),
    ("--model=vgg", "value should be one of"),
    ("--budget_range=2,4", "--budget_range must be 'a,b' with 0 < a <= 1 <= b"),
    ("--budget_range=0.5", "--budget_range must be 'a,b'"),
    ("--batch_size=0", "--batch_size must be > 0"),
  ],
)
def test_bad_flags(tmp_path, flag, message):
  assert_clear_error(run("launch.train", f"--workdir={tmp_path}/w", flag), message)


def test_bad_settings_at_run_time(tmp_path):
  out = run("launch.train", f"--workdir={tmp_path}/a", "--num_train_examples=10", "--batch_size=64")
  assert_clear_error(out, "error: --batch_size=64 is larger than the training set (10 examples)")
  out = run("launch.train", f"--workdir={tmp_path}/b", "--dataset=mnist", f"--data_dir={tmp_path}")
  assert_clear_error(out, "error: ")
  assert "--data_dir" in out.stderr or "MNIST" in out.stderr
  out = run("launch.evaluate", f"--workdir={tmp_path}/nothing")
  assert_clear_error(out, "no config.json")


def test_workdir_of_a_different_model(trained_run):
  out = run("launch.train", f"--workdir={trained_run.workdir}", "--steps=2", "--model=mlp", *SMALL)
  assert_clear_error(out, "holds a run with different settings (--model='dm_small' there vs 'mlp'")


def test_evaluate_and_visualize_a_run(trained_run, tmp_path):
  work = tmp_path / "copy"
  shutil.copytree(trained_run.workdir, work)  # the launchers write into the workdir
  out = run(
    "launch.evaluate",
    f"--workdir={work}",
    "--num_examples=20",
    "--methods=ibp,crown",
    "--attack=pgd",  # the strong attack: test_attacks_strong.py, and on trained_run in test_train
    "--pgd_steps=5",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert (
    "shapes / dm_small / contextual budgets, ε₀ = 0.1, threat own, 20 test examples" in out.stdout
  )
  assert "certified error" in out.stdout and "budget–relevance AUROC" in out.stdout
  assert "evaluated 20/20 examples" in out.stderr  # progress
  results = json.loads((work / "eval.json").read_text())
  assert set(results["certified_error"]) == {"ibp", "crown"} and "samples" not in results
  for name in ("eval.json", "budgets.png"):
    assert stat.S_IMODE(os.stat(work / name).st_mode) & 0o644 == 0o644, name
  out = run("launch.visualize", f"--workdir={work}", "--num_examples=3")
  assert out.returncode == 0, out.stderr[-2000:]
  for name in ("budgets_grid.png", "curves.png"):
    assert (work / name).stat().st_size > 0 and f"wrote {work / name}" in out.stdout


def _params(path):
  return jax.tree.leaves(load_run(path).state.variables.params)


def _wait_for_checkpoint(workdir, proc, at_least, timeout=240):
  manager_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training ended before the kill: {proc.stderr.read()[-2000:]}")
    steps = (
      [int(d) for d in os.listdir(manager_dir) if d.isdigit()] if os.path.isdir(manager_dir) else []
    )
    if steps and max(steps) >= at_least:
      return
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared in time")


def test_sigkill_then_same_command_resumes_to_the_same_parameters(tmp_path):
  args = ["--steps=40", "--checkpoint_every=4", *SMALL]
  assert run("launch.train", f"--workdir={tmp_path}/straight", *args).returncode == 0
  cmd = [sys.executable, "-m", "launch.train", f"--workdir={tmp_path}/killed", *args]
  proc = subprocess.Popen(
    cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  _wait_for_checkpoint(f"{tmp_path}/killed", proc, at_least=8)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = workdir.Manager(f"{tmp_path}/killed").latest_step()
  assert killed_at is not None and killed_at < 40
  out = run("launch.train", f"--workdir={tmp_path}/killed", *args)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from step" in out.stderr
  chex.assert_trees_all_equal(_params(f"{tmp_path}/straight"), _params(f"{tmp_path}/killed"))
  records = workdir.read_metrics(f"{tmp_path}/killed")
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 40  # no duplicates, no gaps at the end


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "launch.train",
    f"--workdir={tmp_path}/w",
    "--steps=400",
    "--checkpoint_every=4",
    *SMALL,
  ]
  proc = subprocess.Popen(
    cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  _wait_for_checkpoint(f"{tmp_path}/w", proc, at_least=4)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-2000:]
  assert "interrupted: run the same command to resume" in stdout
  step = workdir.Manager(f"{tmp_path}/w").latest_step()
  assert 4 <= step < 400
  assert int(load_run(f"{tmp_path}/w").state.step) == step
