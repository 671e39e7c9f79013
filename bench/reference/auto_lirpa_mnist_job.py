"""The reference side of issue 15's job: auto_LiRPA training DM-small on MNIST with CROWN-IBP.

Not part of cbudget (it needs PyTorch and auto_LiRPA, in a venv of their own; torch 2.13.0 is the
CPU build the project's machines hold; auto_LiRPA 0.7.1 asks for torch < 2.9 but runs this job):

  python3 -m venv /tmp/alp && /tmp/alp/bin/pip install torch==2.13.0 numpy packaging appdirs pyyaml tqdm \
    graphviz ninja && /tmp/alp/bin/pip install --no-deps -e PATH_TO_AUTO_LIRPA_CHECKOUT
  /tmp/alp/bin/python bench/reference/auto_lirpa_mnist_job.py --epochs 6 --batch_size 128 --lr 1e-3

The loop is auto_LiRPA's examples/vision/simple_training.py (cross-entropy while eps = 0, then the
robust cross-entropy of beta * CROWN-IBP + (1 - beta) * IBP margin bounds, beta = 1 - eps/eps_max;
Adam), on the same net, data (the raw MNIST files of ../shared/data), eps, batch and epochs as
cbudget's run: 1 clean epoch, eps 0 -> 0.3 linearly over 3 epochs, 2 held. It prints each epoch's
seconds, then evaluates like ``launch.evaluate --num_examples 0 --attack pgd --crown_examples 1024``
without the attack: clean, IBP and CROWN-IBP on the 10,000 test images, full CROWN on the first 1,024.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule
from torch_mnist import bounded, load_mnist, make_net, spec

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=6)
p.add_argument("--batch_size", type=int, default=128)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--eps", type=float, default=0.3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--save", default="auto_lirpa_dm_small.pt")
p.add_argument("--eval_only", action="store_true")
p.add_argument("--crown_examples", type=int, default=1024)
p.add_argument("--data_dir", default="../shared/data")
args = p.parse_args()
torch.manual_seed(args.seed)
np.random.seed(args.seed)
torch.set_num_threads(2)


xtr, ytr, xte, yte = load_mnist(args.data_dir)

net = make_net("dm_small")
model = BoundedModule(net, torch.zeros(2, 1, 28, 28), device="cpu")


steps_per_epoch = (len(ytr) + args.batch_size - 1) // args.batch_size
warm, ramp = steps_per_epoch, 3 * steps_per_epoch
if not args.eval_only:
  opt = torch.optim.Adam(model.parameters(), lr=args.lr)
  step, start = 0, time.time()
  for epoch in range(args.epochs):
    model.train()
    perm = torch.randperm(len(ytr))
    t0, errs, verr = time.time(), [], []
    for i in range(steps_per_epoch):
      b = perm[i * args.batch_size : (i + 1) * args.batch_size]
      x, y = xtr[b], ytr[b]
      eps = args.eps * min(max(step - warm, 0) / ramp, 1.0)
      c = spec(y)
      out = model(bounded(x, eps))
      ce = nn.functional.cross_entropy(out, y)
      if eps < 1e-20:
        loss = ce
      else:
        factor = (args.eps - eps) / args.eps
        ilb, _ = model.compute_bounds(IBP=True, C=c, method=None)
        if factor < 1e-5:
          lb = ilb
        else:
          clb, _ = model.compute_bounds(IBP=False, C=c, method="backward", bound_upper=False)
          lb = clb * factor + ilb * (1 - factor)
        padded = torch.cat([torch.zeros(lb.size(0), 1), lb], 1)
        loss = nn.functional.cross_entropy(-padded, torch.zeros(lb.size(0), dtype=torch.int64))
        verr.append(float((lb < 0).any(1).float().mean()))
      opt.zero_grad()
      loss.backward()
      opt.step()
      errs.append(float((out.argmax(1) != y).float().mean()))
      step += 1
    print(
      f"epoch {epoch + 1} done in {time.time() - t0:.1f} s  eps {eps:.3f}  clean err {np.mean(errs[-50:]):.3f}"
      f"  verified err {np.mean(verr[-50:]) if verr else float('nan'):.3f}",
      flush=True,
    )
  print(f"trained in {time.time() - start:.1f} s", flush=True)
  torch.save(net.state_dict(), args.save)
else:
  net.load_state_dict(torch.load(args.save))
  model = BoundedModule(net, torch.zeros(2, 1, 28, 28), device="cpu")

model.eval()
start = time.time()
clean, ibp_ok, cibp_ok, crown_ok = [], [], [], []
with torch.no_grad():
  for i in range(0, len(yte), 100):
    x, y = xte[i : i + 100], yte[i : i + 100]
    c = spec(y)
    out = model(bounded(x, args.eps))
    clean.append(out.argmax(1) == y)
    lb, _ = model.compute_bounds(IBP=True, C=c, method=None)
    ibp_ok.append((lb > 0).all(1))
    lb, _ = model.compute_bounds(IBP=True, C=c, method="backward", bound_upper=False)
    cibp_ok.append((lb > 0).all(1))
t_fast = time.time() - start
t1 = time.time()
for i in range(0, args.crown_examples, 64):
  x, y = xte[i : min(i + 64, args.crown_examples)], yte[i : min(i + 64, args.crown_examples)]
  model(bounded(x, args.eps))
  lb, _ = model.compute_bounds(C=spec(y), method="CROWN", bound_upper=False)
  crown_ok.append((lb.detach() > 0).all(1))
t_crown = time.time() - t1
err = lambda ok: 1 - float(torch.cat(ok).float().mean())
n = args.crown_examples
print(
  f"eval: clean {err(clean):.4f}  ibp {err(ibp_ok):.4f}  crown-ibp {err(cibp_ok):.4f} (10k)"
  f"  first {n}: ibp {1 - float(torch.cat(ibp_ok)[:n].float().mean()):.4f}"
  f" crown {err(crown_ok):.4f}  | {t_fast:.1f} s clean+IBP+CROWN-IBP on 10k,"
  f" {t_crown:.1f} s full CROWN on {n} ({n / t_crown:.1f} img/s)",
  flush=True,
)
