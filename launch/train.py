r"""Train a classifier (and its budget generator) with certified training.

  python -m launch.train --workdir workdir/demo                      # the embedded demo
  python -m launch.train --preset mnist_contextual_0.3 --data_dir ../shared/data --workdir w/mnist

Running the same command again resumes from the last checkpoint in --workdir.
"""

import dataclasses
import logging

from absl import flags

from cbudget import data
from cbudget.budgets import BUDGET_MODES
from cbudget.budgets import SQUASHES as BUDGET_SQUASHES
from cbudget.budgets import VOLUMES as BUDGET_VOLUMES
from cbudget.models.classifiers import CLASSIFIERS
from cbudget.models.generators import GENERATORS
from cbudget.methods import TRAIN_METHODS
from cbudget.train import BETA_SCHEDULES, INITS
from launch import presets
from launch.common import parse_range, run_main, setup_devices

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir", None, "Where checkpoints, metrics and config.json go.", required=True
)
flags.DEFINE_string(
  "preset", "demo", "Named settings (see launch/presets.py); flags override them."
)
flags.DEFINE_enum(
  "schedule", "cpu", ["cpu", "paper"], "Preset schedule: reduced CPU or the paper's."
)
flags.DEFINE_enum("dataset", "shapes", list(data.DATASETS), "Dataset name.")
flags.DEFINE_string("data_dir", None, "Folder of the standard raw files (offline); else TFDS.")
flags.DEFINE_enum("model", "dm_small", list(CLASSIFIERS), "Classifier architecture.")
flags.DEFINE_enum("generator", "coarse", list(GENERATORS), "Budget generator (contextual mode).")
flags.DEFINE_enum("budget", "contextual", list(BUDGET_MODES), "Budget mode.")
flags.DEFINE_bool("per_pixel", True, "One budget per pixel (shared across channels).")
flags.DEFINE_float("eps", 0.2, "Target ε₀: budgets have the volume of a uniform ε₀.")
flags.DEFINE_string("budget_range", "0.25,4", "a,b: every budget within [a·ε₀, b·ε₀], a ≤ 1 ≤ b.")
flags.DEFINE_enum(
  "volume",
  "nominal",
  list(BUDGET_VOLUMES),
  "Volume constraint: 'nominal' (mean log ε = log ε₀) or 'effective' (the boxes clipped to "
  "[0, 1] have a uniform ε₀'s log-volume on the same image).",
)
flags.DEFINE_enum(
  "squash",
  "clip",
  list(BUDGET_SQUASHES),
  "How shifted raw log-budgets enter [a·ε₀, b·ε₀]: 'clip' (saturated budgets get no gradient) or "
  "'sigmoid' (a sigmoid between the ends: every budget keeps a gradient; needs a < 1 < b).",
)
flags.DEFINE_enum(
  "method",
  "ibp",
  list(TRAIN_METHODS),
  "Training method (cbudget/methods.py): bounds or SABR/MTL-IBP.",
)
flags.DEFINE_float("sabr_lambda", 0.4, "SABR: the small box's radius is λ·ε(x), 0 < λ <= 1.")
flags.DEFINE_float("mtl_alpha", 0.5, "MTL-IBP: α·IBP loss + (1 − α)·adversarial loss.")
flags.DEFINE_integer("train_attack_steps", 8, "PGD steps of SABR's and MTL-IBP's training attack.")
flags.DEFINE_enum(
  "init",
  "default",
  list(INITS),
  "Classifier init: Flax's default, fast (Shi et al. 2021) or torch (PyTorch's default, as in "
  "auto_LiRPA's runs).",
)
flags.DEFINE_float("fast_reg", 0.0, "Weight of Shi et al.'s warm-up regularisers (0: off).")
flags.DEFINE_string(
  "lr_decay", "0.75,0.9", "Shares of training where the LR drops ('none': no drop)."
)
flags.DEFINE_float("lr_decay_factor", 0.1, "Factor of each learning-rate drop.")
flags.DEFINE_float("train_eps_factor", 1.0, "Train at ε₀·factor (CROWN-IBP: 1.1–1.33), test at ε₀.")
flags.DEFINE_bool("precise_bn", False, "Recompute BatchNorm statistics on clean data each epoch.")
flags.DEFINE_integer("precise_bn_batches", 20, "Batches that --precise_bn pools statistics over.")
flags.DEFINE_enum(
  "beta_schedule", "linear", list(BETA_SCHEDULES), "CROWN-IBP β: linear 1→0, or eps: 1 − ε/ε_max."
)
flags.DEFINE_integer("epochs", 20, "Training epochs.")
flags.DEFINE_integer("steps", None, "Training steps (overrides --epochs).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed (init, data order, augmentation).")
flags.DEFINE_float("lr", 1e-3, "Classifier learning rate (Adam).")
flags.DEFINE_float("generator_lr", 1e-3, "Budget generator learning rate (Adam).")
flags.DEFINE_float("grad_clip", 10.0, "Gradient global-norm clipping.")
flags.DEFINE_float("warmup_fraction", 0.1, "Share of steps with ε₀ = 0 (clean training).")
flags.DEFINE_float("ramp_fraction", 0.5, "Share of steps over which ε₀ grows to --eps.")
flags.DEFINE_enum("eps_schedule", "smooth", ["linear", "smooth"], "Shape of the ε₀ ramp.")
flags.DEFINE_float("kappa_end", 0.0, "Final weight of the clean loss (κ goes 1 → kappa_end).")
flags.DEFINE_bool("augment", None, "Random crop + flip (default: on for CIFAR data).")
flags.DEFINE_integer("num_train_examples", None, "Use only the first N training examples.")
flags.DEFINE_integer("log_every", 50, "Log and write metrics every N steps.")
flags.DEFINE_integer("checkpoint_every", 200, "Checkpoint every N steps.")
flags.DEFINE_bool("skip_nonfinite", False, "Skip a step with NaN/Inf loss instead of stopping.")
flags.DEFINE_bool(
  "loss_fusion",
  False,
  "CROWN-IBP: bound the cross-entropy directly (one backward row per example).",
)
flags.DEFINE_integer(
  "bound_block",
  -1,
  "CROWN-IBP: bound blocks of this many examples at a time (same bounds): 0 the whole batch, -1 "
  "auto (16 on one CPU device for batches over 32, where it is faster; else the whole batch).",
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: jax.distributed coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

flags.register_validator("eps", lambda v: v > 0, "--eps must be > 0")
flags.register_validator("batch_size", lambda v: v > 0, "--batch_size must be > 0")
flags.register_validator("epochs", lambda v: v > 0, "--epochs must be > 0")
flags.register_validator("steps", lambda v: v is None or v > 0, "--steps must be > 0")
flags.register_validator(
  "budget_range",
  lambda v: _range_ok(v),
  "--budget_range must be 'a,b' with 0 < a <= 1 <= b (e.g. 0.25,4)",
)
flags.register_validator("warmup_fraction", lambda v: 0 <= v < 1, "--warmup_fraction in [0, 1)")
flags.register_validator(
  "bound_block", lambda v: v >= -1, "--bound_block must be > 0, 0 (whole batch) or -1 (auto)"
)
flags.register_validator("ramp_fraction", lambda v: 0 <= v <= 1, "--ramp_fraction in [0, 1]")


def _range_ok(value):
  try:
    a, b = parse_range(value)
  except ValueError:
    return False
  return 0 < a <= 1 <= b


def config_from_flags():
  from cbudget.train import TrainConfig

  values = presets.preset_values(FLAGS.preset, FLAGS.schedule)
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  for name in names:
    if name in FLAGS and (FLAGS[name].present or name not in values):
      values[name] = FLAGS[name].value
  values["budget_range"] = (
    parse_range(values["budget_range"])
    if isinstance(values["budget_range"], str)
    else tuple(values["budget_range"])
  )
  return TrainConfig(**{k: v for k, v in values.items() if k in names})


def main(argv):
  del argv
  from cbudget.train import train

  setup_devices(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = config_from_flags()
  logging.getLogger("cbudget").info("config: %s", config)
  result = train(config)
  print(
    f"trained to step {result['step']}: clean error {result.get('clean_error', float('nan')):.3f}, "
    f"certified error (batch, {config.method}) {result.get('certified_error', float('nan')):.3f}"
    + ("  [interrupted: run the same command to resume]" if result["interrupted"] else "")
  )


if __name__ == "__main__":
  run_main(main)
