"""launch.reproduce's table: one row per preset, mean ± std over seeds, every column on one set."""

import json

from launch import reproduce


def _result(seed, clean, ibp, best, common_n=200):
  return {
    "preset": "mnist_canvas_contextual",
    "seed": seed,
    "eps": 0.1,
    "volume": "effective",
    "num_examples": 1000,
    "common": {
      "num_examples": common_n,
      "clean_error": clean,
      "pgd_error": clean + 0.01,
      "certified_error": {"ibp": ibp, "crown": ibp - 0.02},
      "certified_error_best": best,
    },
    "certified_error": {"ibp": 0.5, "crown": 0.1},  # on different subsets: never shown
    "budget": {
      "equivalent_eps": 0.12,
      "effective_equivalent_eps": 0.07,
      "uniform_effective_equivalent_eps": 0.07,
    },
    "relevance_auroc": 0.9,
    "context_auroc": 0.8,
    "intensity_rule_auroc": 0.55,
    "train_seconds": 10.0,
    "machine": "test",
  }


def test_table_mean_std_over_seeds_on_common_examples(tmp_path):
  for seed, (clean, ibp, best) in enumerate([(0.02, 0.10, 0.07), (0.04, 0.14, 0.09)]):
    (tmp_path / f"run-s{seed}.json").write_text(json.dumps(_result(seed, clean, ibp, best)))
  old = _result(0, 0.0, 0.0, 0.0)
  del old["common"]  # a result from before the common example set: left out
  (tmp_path / "old.json").write_text(json.dumps({**old, "preset": "old"}))
  lines = reproduce.table(str(tmp_path)).splitlines()
  assert len(lines) == 3  # head, separator, one row for both seeds
  row = lines[2]
  assert "| mnist_canvas_contextual | 0.1 | effective | 2 | 200 |" in row
  assert "| 3.0 ± 1.4 |" in row  # clean: mean and sample std of 2 % and 4 %
  assert "| 12.0 ± 2.8 | – | 10.0 ± 2.8 | 8.0 ± 1.4 |" in row  # IBP, CROWN-IBP, CROWN, best
  assert "0.12 / 0.07 (0.07)" in row and "| 0.800 ± 0.000 |" in row and "| 0.550 ± 0.000 |" in row
  assert "50.0" not in row  # the per-method numbers on other subsets are not in the table


def test_run_names():
  assert reproduce.run_name("mnist_uniform_0.3", 2, None) == "mnist_uniform_0.3-s2"
  assert reproduce.run_name("mnist_canvas_uniform", 0, 0.05) == "mnist_canvas_uniform-eps0.05-s0"


def test_training_seconds_add_up_over_resumed_processes(tmp_path):
  records = [
    {"step": 2, "seconds": 3.0},
    {"step": 4, "seconds": 5.0},
    {"event": "resumed", "step": 4},  # a second process: its clock starts again
    {"step": 6, "seconds": 2.5},
    {"event": "resumed", "step": 6},  # a third that found the run finished
  ]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert reproduce.training_seconds(str(tmp_path)) == 7.5
