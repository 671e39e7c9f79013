"""Phase-aware training: the cheaper step of each phase computes the full objective's loss and
gradients, and a run interrupted in one phase resumes into the next exactly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbudget import data, workdir
from cbudget.evaluate import load_run
from cbudget.train import (
  PHASES,
  init_state,
  make_loss_fn,
  make_setup,
  make_train_step,
  phase_per_step,
  phase_ranges,
  train,
)
from tests.conftest import tiny_config

# 12 steps: clean while eps0 = 0 (steps 0-3), the CROWN-IBP mix while beta falls (4-8), IBP (9-11).
PHASED = dict(method="crown-ibp", model="mlp", steps=12, warmup_fraction=0.25, ramp_fraction=0.5)


def _setup(tmp_path, **overrides):
  config = tiny_config(tmp_path / "run", **{**PHASED, **overrides})
  return make_setup(config, steps_per_epoch=8), config


def test_phases_follow_the_schedules(tmp_path):
  setup, config = _setup(tmp_path)
  phases = phase_per_step(setup, config)
  assert phase_ranges(phases) == [("clean", 0, 4), ("full", 4, 9), ("ibp", 9, 12)]
  eps0, beta = np.asarray(setup.eps0(jnp.arange(12))), np.asarray(setup.beta(jnp.arange(12)))
  assert np.all(eps0[:4] == 0) and np.all(eps0[4:] > 0)
  assert np.all(beta[4:9] > 0) and np.all(beta[9:] == 0)
  # IBP, SABR and MTL-IBP have no CROWN-IBP pass to skip; the warm-up regularisers act while
  # eps0 = 0, so with them on there is no clean phase.
  for method in ("ibp", "sabr", "mtl-ibp"):
    setup, config = _setup(tmp_path, method=method)
    assert [p for p, _, _ in phase_ranges(phase_per_step(setup, config))] == ["clean", "full"]
  setup, config = _setup(tmp_path, method="sabr", fast_reg=0.5)
  assert [p for p, _, _ in phase_ranges(phase_per_step(setup, config))] == ["full"]


@pytest.mark.parametrize(
  "step,phase,method,fusion",
  [
    (2, "clean", "crown-ibp", False),
    (3, "clean", "sabr", False),
    (1, "clean", "mtl-ibp", False),
    (10, "ibp", "crown-ibp", False),
    (11, "ibp", "crown-ibp", True),
  ],
)
def test_phase_step_equals_the_full_step(tmp_path, step, phase, method, fusion):
  setup, config = _setup(tmp_path, budget="global", method=method, loss_fusion=fusion)
  assert PHASES[phase_per_step(setup, config)[step]] == phase
  batch = next(data.batches(data.load("shapes", "train", num_examples=32), 32, seed=0, epoch=0))
  state = init_state(setup, config)
  params, stats = state.variables

  def value_and_grad(which):
    fn = jax.jit(jax.value_and_grad(make_loss_fn(setup, config, which), has_aux=True))
    return fn(params, stats, batch["image"], batch["label"], jnp.asarray(step))

  (loss, (_, metrics)), grads = value_and_grad(phase)
  (full_loss, (_, full_metrics)), full_grads = value_and_grad("full")
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, full_grads, rtol=1e-5, atol=1e-7)
  for name in ("clean_loss", "clean_error", "eps0", "kappa", "beta", "equivalent_eps"):
    np.testing.assert_allclose(metrics[name], full_metrics[name], rtol=1e-6, err_msg=name)
  if phase == "clean":  # no bounds: nothing is claimed certified
    assert np.isnan(metrics["certified_error"]) and np.isnan(metrics["robust_loss"])
  else:
    np.testing.assert_allclose(metrics["certified_error"], full_metrics["certified_error"])
    np.testing.assert_allclose(metrics["robust_loss"], full_metrics["robust_loss"], rtol=1e-6)


def test_unknown_phase_is_a_clear_error(tmp_path):
  setup, config = _setup(tmp_path)
  with pytest.raises(ValueError, match="phase must be one of"):
    make_train_step(setup, config, "warmup")


def test_resume_across_phases_equals_uninterrupted(tmp_path):
  straight = tiny_config(tmp_path / "straight", **PHASED)
  train(straight)
  resumed = tiny_config(tmp_path / "resumed", **PHASED)
  train(resumed, until_step=3)  # in the clean phase...
  train(resumed, until_step=7)  # ...resumed into the CROWN-IBP phase...
  result = train(resumed)  # ...and into the IBP phase
  assert result["step"] == 12 and result["phase"] == "ibp"
  a, b = load_run(straight.workdir).state, load_run(resumed.workdir).state
  chex.assert_trees_all_equal(a.variables, b.variables)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  records = [r for r in workdir.read_metrics(resumed.workdir) if "loss" in r]
  assert [(r["step"], r["phase"]) for r in records] == [
    (2, "clean"),
    (4, "clean"),
    (6, "full"),
    (8, "full"),
    (10, "ibp"),
    (12, "ibp"),
  ]
  assert np.isnan(records[0]["certified_error"]) and np.isfinite(records[2]["certified_error"])
