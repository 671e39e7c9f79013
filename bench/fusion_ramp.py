"""Margin form against loss fusion where they part: the first steps of the ε ramp.

  python -m bench.fusion_ramp --data_dir ../shared/data --root /tmp/fusion_ramp [--ramp_steps 231]

Issue 15's 6-epoch CROWN-IBP job (results/crown_ibp_job_mnist03/run.sh, seed 0) is trained through
its clean epoch once (469 steps), then resumed from there twice, with the margin form and with
``--loss_fusion``, for ``--ramp_steps`` steps. Prints the robust loss and the batch's certified
error every 30 steps of each. ``python -m bench.loss_fusion --workdir ROOT/margin`` then compares
the two bounds on the same net.
"""

import argparse
import dataclasses
import json
import os
import shutil

from cbudget.train import TrainConfig, train

CLEAN_STEPS = 469  # one epoch of 60,000 images in batches of 128


def train_to(config: TrainConfig, step: int, what: str):
  """Train (or resume) ``config`` to ``step``; stop the script if a signal interrupted it."""
  if train(config, until_step=step)["step"] != step:
    raise SystemExit(f"interrupted in the {what}: run the same command again to resume")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--root", required=True, help="scratch folder for the three runs")
  parser.add_argument("--ramp_steps", type=int, default=231)
  args = parser.parse_args()
  config = TrainConfig(  # run.sh's flags
    workdir=os.path.join(args.root, "clean"),
    dataset="mnist",
    data_dir=args.data_dir,
    model="dm_small",
    budget="uniform",
    method="crown-ibp",
    eps=0.3,
    batch_size=128,
    epochs=6,
    warmup_fraction=0.1667,
    ramp_fraction=0.5,
    beta_schedule="eps",
    init="torch",
    seed=0,
    log_every=10,
    checkpoint_every=100_000,
  )
  train_to(config, CLEAN_STEPS, "clean epoch")
  for form in ("margin", "fused"):
    workdir = os.path.join(args.root, form)
    if not os.path.exists(workdir):
      shutil.copytree(config.workdir, workdir)
    run = dataclasses.replace(config, workdir=workdir, loss_fusion=form == "fused")
    train_to(run, CLEAN_STEPS + args.ramp_steps, f"{form} run")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [r for r in map(json.loads, f) if r["step"] > CLEAN_STEPS and r["step"] % 30 == 0]
    print(f"{form:6s} step: robust loss / batch certified error")
    print(
      "  "
      + "  ".join(f"{r['step']}: {r['robust_loss']:.3f}/{r['certified_error']:.2f}" for r in rows)
    )


if __name__ == "__main__":
  main()
