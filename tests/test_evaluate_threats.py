"""Cross-evaluation plumbing: threats (own, uniform:E, budgets:WORKDIR), one example set per table."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cbudget import evaluate as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PGD alone: the strong attack is tested in test_attacks_strong.py and on trained_run (test_train).
FAST = dict(num_examples=24, methods=("ibp", "crown-ibp"), batch_size=12, pgd_steps=3, attack="pgd")


@pytest.fixture(scope="module")
def own(trained_run):
  return ev.evaluate(trained_run.workdir, **FAST)


def test_own_threat_reports_every_column_on_the_same_examples(trained_run, own):
  assert own["threat"] == "own" and own["volume"] == "nominal"
  common = own["common"]
  assert common["num_examples"] == own["num_examples"] == 24
  best = common["certified_error_best"]
  assert best <= min(common["certified_error"].values())
  assert common["clean_error"] <= common["pgd_error"] <= best
  b = own["budget"]
  # shapes has black backgrounds: the clipped boxes are smaller than the nominal ones
  assert b["effective_equivalent_eps"] < b["equivalent_eps"]
  assert b["uniform_effective_equivalent_eps"] < trained_run.eps
  for key in ("relevance_auroc", "intensity_rule_auroc"):
    assert 0.0 <= own[key] <= 1.0
  # NaN where no intensity level holds both a relevant and an irrelevant pixel (shapes' continuous
  # intensities); otherwise an AUROC
  assert np.isnan(own["context_auroc"]) or 0.0 <= own["context_auroc"] <= 1.0
  assert own["intensity_rule"].startswith("small budget") or "budget" in own["intensity_rule"]


def test_full_crown_on_fewer_examples_shrinks_the_common_set(trained_run):
  out = ev.evaluate(trained_run.workdir, **{**FAST, "methods": ("ibp", "crown")}, crown_examples=5)
  assert out["certified_examples"] == {"ibp": 24, "crown": 5}
  assert out["common"]["num_examples"] == 5
  assert out["common"]["certified_error_best"] <= out["common"]["certified_error"]["crown"]


def test_budgets_of_the_same_run_equal_its_own(trained_run, own):
  same = ev.evaluate(trained_run.workdir, threat=f"budgets:{trained_run.workdir}", **FAST)
  assert same["threat"] == f"budgets:{trained_run.workdir}"
  assert same["certified_error"] == own["certified_error"]
  assert same["budget"] == own["budget"]


def test_uniform_threat_certifies_under_a_uniform_box(trained_run):
  run = ev.load_run(trained_run.workdir)
  threat = ev.threat_budgets("uniform:0.05", run)
  test_set = ev.load_test_set(run.config, 12)
  result = ev.certify(
    run.setup.model,
    run.state.variables,
    test_set,
    run.config.eps,
    threat=threat,
    methods=("ibp",),
    batch_size=12,
    pgd_steps=3,
  )
  np.testing.assert_array_equal(result.eps, np.float32(0.05))
  out = ev.report(run.config, result, test_set, threat=threat)
  assert out["threat"] == "uniform:0.05"
  np.testing.assert_allclose(out["budget"]["equivalent_eps"], 0.05, rtol=1e-5)  # float32 log-mean
  np.testing.assert_allclose(
    out["budget"]["effective_equivalent_eps"], out["budget"]["uniform_effective_equivalent_eps"]
  )
  # a smaller uniform box is never harder to certify (IBP is monotone in the box)
  small = ev.certify(
    run.setup.model,
    run.state.variables,
    test_set,
    run.config.eps,
    threat=ev.threat_budgets("uniform:0.01", run),
    methods=("ibp",),
    batch_size=12,
    pgd_steps=3,
  )
  assert np.all(small.certified["ibp"] >= result.certified["ibp"])


@pytest.mark.parametrize(
  "spec,message",
  [
    ("uniform", "not one of"),
    ("uniform:x", "must be a number"),
    ("uniform:2", "must be in"),
    ("mine", "not one of"),
  ],
)
def test_bad_threats(trained_run, spec, message):
  with pytest.raises(ValueError, match=message):
    ev.threat_budgets(spec, ev.load_run(trained_run.workdir))


def test_launcher_threat_flag(trained_run, tmp_path):
  import shutil

  work = tmp_path / "copy"
  shutil.copytree(trained_run.workdir, work)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.evaluate",
      f"--workdir={work}",
      "--threat=uniform:0.05",
      "--num_examples=10",
      "--methods=ibp",
      "--pgd_steps=2",
      "--attack=pgd",
    ],
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "threat uniform:0.05" in out.stdout and "best per example" in out.stdout
  results = json.loads((work / "eval-uniform_0.05.json").read_text())
  assert results["threat"] == "uniform:0.05" and not (work / "budgets.png").exists()


def test_cross_evaluation_matrix(trained_run):
  from launch.cross_evaluate import cross_evaluate, markdown, threats_for

  models = {"ctx": trained_run.workdir}
  columns = threats_for(models)
  a = trained_run.budget_range[0]
  assert columns == {
    "own": "own",
    "uniform 0.1": "uniform:0.1",
    f"uniform {a:g}·ε₀": f"uniform:{a * 0.1}",
    "ctx's budgets": f"budgets:{trained_run.workdir}",
  }
  matrix = cross_evaluate(
    models, num_examples=8, methods=("ibp",), batch_size=8, pgd_steps=2, attack="pgd"
  )
  row = matrix["ctx"]
  assert row["own"]["certified_error"] == row["ctx's budgets"]["certified_error"]
  # the floor a·ε₀ is inside ε₀'s box: never harder to certify
  assert (
    row[f"uniform {a:g}·ε₀"]["common"]["certified_error"]["ibp"]
    <= (row["uniform 0.1"]["common"]["certified_error"]["ibp"])
  )
  table = markdown([matrix], "ibp")
  assert table.count("\n") == 5 and "| ctx | " in table
  # Several matrices (seeds): each cell is mean ± sample std.
  other = copy.deepcopy(matrix)
  err = row["own"]["common"]["certified_error"]["ibp"]
  other["ctx"]["own"]["common"]["certified_error"]["ibp"] = err + 0.02
  own_cell = markdown([matrix, other], "ibp").splitlines()[-1].split(" | ")[1]
  assert own_cell == f"{100 * err + 1:.1f} ± {2 / 2**0.5:.1f}", own_cell
  del other["ctx"]["own"]
  with pytest.raises(ValueError, match="different models or threats"):
    markdown([matrix, other], "ibp")


def test_cross_evaluate_combines_matrices_written_before(tmp_path):
  """``--combine``: one table of mean ± std from JSON matrices, into a folder not there yet."""
  paths = []
  for seed, err in enumerate((0.1, 0.3)):
    cell = {"common": {"certified_error": {"ibp": err}, "certified_error_best": err}}
    paths.append(tmp_path / f"cross_s{seed}.json")
    paths[-1].write_text(json.dumps({"ctx": {"own": cell, "uniform 0.1": cell}}))
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.cross_evaluate",
      "--combine",
      ",".join(map(str, paths)),
      f"--out={tmp_path}/new/cross",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  table = (tmp_path / "new" / "cross.md").read_text()
  assert "mean ± std over 2 matrices" in table
  assert "| ctx | 20.0 ± 14.1 | 20.0 ± 14.1 |" in table  # ibp (crown-ibp is in no matrix)
  assert "crown-ibp" not in table


def test_alpha_crown_and_the_largest_box_in_evaluation(trained_run):
  out = ev.evaluate(
    trained_run.workdir,
    **{**FAST, "num_examples": 4, "methods": ("crown", "alpha-crown")},
    certified_box_examples=2,
  )
  errors = out["common"]["certified_error"]
  assert errors["alpha-crown"] <= errors["crown"]  # α-CROWN keeps the best bound, CROWN's included
  box = out["certified_box"]
  assert box["method"] == "crown" and box["num_examples"] == 2
  assert box["median_ratio"] is None or box["median_ratio"] >= 1.0
