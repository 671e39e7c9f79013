#!/bin/bash
# Issue 15's 6-epoch CROWN-IBP job on MNIST (DM-small, eps 0.3, batch 128; 1 clean, 3 ramp, 2 held
# epochs; beta = 1 - eps/eps_max), trained and evaluated on all 10,000 test images (full CROWN on the
# first 1,024), as in the README's side-by-side table.
# usage: results/crown_ibp_job_mnist03/run.sh NAME SEED [extra train flags, e.g. --loss_fusion]
set -e
name=$1; seed=$2; shift 2
W=${OUT:-runs/crown_ibp_job_mnist03}/$name
time python -m launch.train --dataset mnist --data_dir ../shared/data --model dm_small \
  --budget uniform --method crown-ibp --eps 0.3 --batch_size 128 --epochs 6 \
  --warmup_fraction 0.1667 --ramp_fraction 0.5 --beta_schedule eps --init torch --seed "$seed" \
  --log_every 200 --checkpoint_every 1000 --workdir "$W" "$@"
time python -m launch.evaluate --workdir "$W" --num_examples 0 --attack pgd --crown_examples 1024 \
  --noplot
# The reference: bench/reference/auto_lirpa_mnist_job.py --epochs 6 --batch_size 128 --lr 1e-3
# (in auto_LiRPA's own venv; see its docstring).
