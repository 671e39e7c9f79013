#!/bin/bash
# One row of the README's "methods x budgets" table: train a preset, evaluate on 1,000 test images.
# usage: results/methods_mnist03/run.sh NAME PRESET [extra train flags...]   (from the repo root)
#   e.g. run.sh sabr_uni mnist_uniform_0.3_sabr;  run.sh ibp_uni_torch mnist_uniform_0.3 --init torch
set -e
name=$1; preset=$2; shift 2
out=${OUT:-runs/methods_mnist03}
mkdir -p "$out"
W=$out/$name
start=$(date +%s)
python -m launch.train --preset "$preset" --data_dir ../shared/data --workdir "$W" --log_every 300 "$@"
mid=$(date +%s)
python -m launch.evaluate --workdir "$W" --num_examples 1000 --methods ibp,crown-ibp --noplot
end=$(date +%s)
echo "$name $preset train $((mid - start))s eval $((end - mid))s flags: $*"
# The cross-evaluation of two rows:
#   python -m launch.cross_evaluate --workdirs uniform=$out/ibp_uni,contextual=$out/ibp_ctx \
#     --methods ibp --out $out/cross
