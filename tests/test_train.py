"""End to end: a few training steps on the embedded data, evaluation, resume, bad settings."""

import json
import os
import stat

import chex
import jax
import numpy as np
import pytest

from cbudget import workdir
from cbudget.evaluate import evaluate, load_run
from cbudget.train import NonFiniteError, train
from tests.conftest import tiny_config


def tiny(tmp_path, name="run", **kw):
  return tiny_config(tmp_path / name, **kw)


@pytest.mark.parametrize(
  "budget,method,eval_methods,attack",
  [
    ("uniform", "ibp", ("ibp", "crown-ibp"), "pgd"),
    ("global", "ibp", ("ibp", "crown-ibp"), "pgd"),
    # Contextual IBP training is what trained_run (evaluated below) and the resume test run;
    # CROWN-IBP training, full CROWN and the default (strong) attack run once here (every budget
    # mode gives them the same kind of box; test_methods.py trains every method in every mode,
    # test_attacks_strong.py tests the attack itself).
    ("contextual", "crown-ibp", ("ibp", "crown-ibp", "crown"), "strong"),
  ],
)
def test_smoke_train_then_evaluate(tmp_path, budget, method, eval_methods, attack):
  config = tiny(tmp_path, budget=budget, method=method, steps=4)
  result = train(config)
  assert result["step"] == 4 and not result["interrupted"]
  records = workdir.read_metrics(config.workdir)
  assert [r["step"] for r in records] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in records)
  # The volume constraint holds during training: equivalent ε equals the scheduled ε₀.
  for r in records:
    assert r["equivalent_eps"] == pytest.approx(r["eps0"], rel=1e-4, abs=1e-7)
  results = evaluate(
    config.workdir,
    num_examples=20,
    batch_size=20,
    pgd_steps=3,
    methods=eval_methods,
    attack=attack,
  )
  assert set(results["certified_error"]) == set(eval_methods)
  assert 0 <= results["clean_error"] <= results["pgd_error"]
  for err in results["certified_error"].values():
    assert results["pgd_error"] <= err <= 1
  assert results["budget"]["equivalent_eps"] == pytest.approx(config.eps, rel=1e-4)
  assert 0 <= results["relevance_auroc"] <= 1


def test_clean_le_pgd_le_certified_on_a_trained_model(trained_run, tmp_path):
  """Trained long enough to certify some examples: the ordering must hold with real numbers."""
  plot = str(tmp_path / "budgets.png")
  r = evaluate(
    trained_run.workdir,
    num_examples=32,
    batch_size=32,
    pgd_steps=10,
    x64=True,
    plot=plot,
  )
  assert r["num_examples"] == 32 and r["clean_error"] <= r["pgd_error"]
  for method, err in r["certified_error"].items():
    assert r["pgd_error"] <= err, method
  assert min(r["certified_error"].values()) < 0.9, "the model should certify some examples"
  # Whatever float32 certifies, float64 certifies too (report, and on this model: none differ).
  assert r["float32_only_certified"] == {m: 0 for m in r["certified_error"]}
  assert os.path.getsize(plot) > 0


def test_resume_equals_uninterrupted(tmp_path):
  straight = tiny(tmp_path, "straight", steps=8)
  train(straight)
  resumed = tiny(tmp_path, "resumed", steps=8)
  train(resumed, until_step=3)  # stopped between checkpoints...
  assert workdir.Manager(resumed.workdir).latest_step() == 3
  result = train(resumed)  # ...and the same command again
  assert result["step"] == 8
  a, b = load_run(straight.workdir).state, load_run(resumed.workdir).state
  chex.assert_trees_all_equal(a.variables, b.variables)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  steps = [r["step"] for r in workdir.read_metrics(resumed.workdir) if "loss" in r]
  assert steps == [2, 4, 6, 8]  # metrics continue from the checkpoint, without duplicates
  # Both files were rewritten atomically on resume (through mkstemp's 0600), and are 0644 again.
  for name in ("config.json", "metrics.jsonl"):
    mode = stat.S_IMODE(os.stat(os.path.join(resumed.workdir, name)).st_mode)
    assert mode & 0o644 == 0o644, f"{name} has mode {oct(mode)}"


def test_workdir_of_another_model_is_refused(trained_run):
  other = tiny_config(trained_run.workdir, model="mlp", steps=2)
  with pytest.raises(ValueError, match="--model='dm_small' there vs 'mlp' now"):
    train(other)


def test_config_written_before_a_field_existed_resumes(tmp_path):
  """A ``config.json`` without a field added since (``squash``, ``volume``) matches the field's
  default, and still differs from any other value."""
  import dataclasses

  from cbudget.train import TrainConfig, config_defaults

  config = dataclasses.asdict(tiny_config(tmp_path))
  older = {k: v for k, v in config.items() if k not in ("squash", "volume")}
  (tmp_path / "config.json").write_text(json.dumps(older))
  workdir.check_or_write_config(str(tmp_path), config, TrainConfig.IDENTITY, config_defaults())
  assert json.loads((tmp_path / "config.json").read_text())["squash"] == "clip"  # rewritten
  (tmp_path / "config.json").write_text(json.dumps(older))
  with pytest.raises(ValueError, match="--squash='clip' there vs 'sigmoid' now"):
    workdir.check_or_write_config(
      str(tmp_path), {**config, "squash": "sigmoid"}, TrainConfig.IDENTITY, config_defaults()
    )


def test_bad_settings_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="--eps must be > 0"):
    train(tiny(tmp_path, eps=0.0, steps=1))
  with pytest.raises(ValueError, match="budget range"):
    train(tiny(tmp_path, budget_range=(2.0, 4.0), steps=1))
  with pytest.raises(ValueError, match="--batch_size=512 is larger than the training set"):
    train(tiny(tmp_path, batch_size=512, steps=1))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny(tmp_path, steps=40, lr=1e38, checkpoint_every=1, log_every=1)
  with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step (\d+)"):
    train(config)
  last = workdir.Manager(config.workdir).latest_step()
  state = load_run(config.workdir).state
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.variables.params))
  assert last is not None and int(state.step) == last
