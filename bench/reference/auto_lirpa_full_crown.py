"""The reference side of full-CROWN certification on the same weights: auto_LiRPA on DM-small or
cnn_small, MNIST, uniform ε.

Not part of cbudget (PyTorch and auto_LiRPA, in a venv of their own; see auto_lirpa_mnist_job.py).
It trains the net briefly with IBP (auto_LiRPA's IBP bounds; the trained net has the mix of stable
and unstable ReLUs that makes full CROWN's cost realistic), certifies the first ``--num_examples``
test images with full CROWN (``compute_bounds(method="backward")``: CROWN bounds for every
intermediate layer, as ``cbudget.bounds.crown(f, "crown")``), and writes the weights, those test
images and auto_LiRPA's bounds to ``--out``. ``python -m bench.full_crown --reference OUT`` then
certifies the same images with the same weights in cbudget:

  /tmp/alp/bin/python bench/reference/auto_lirpa_full_crown.py --net cnn_small --out /tmp/cnn_small.npz
  python -m bench.full_crown --reference /tmp/cnn_small.npz

The time is the median over ``--repeats`` passes over all the images, in batches of ``--batch``.
"""

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule
from torch_mnist import bounded, load_mnist, make_net, spec

p = argparse.ArgumentParser()
p.add_argument("--net", choices=["dm_small", "cnn_small"], default="dm_small")
p.add_argument("--eps", type=float, default=0.3)
p.add_argument("--train_epochs", type=int, default=3)
p.add_argument("--num_examples", type=int, default=200)
p.add_argument("--batch", type=int, default=100)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--data_dir", default="../shared/data")
p.add_argument("--out", required=True)
p.add_argument("--conv_mode", choices=["patches", "matrix"], default="patches")
p.add_argument("--load", help="take the weights from this earlier --out file instead of training")
args = p.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(2)


xtr, ytr, xte, yte = load_mnist(args.data_dir)

net = make_net(args.net)
if args.load:
  saved = np.load(args.load)
  net.load_state_dict(
    {k[6:]: torch.tensor(saved[k]) for k in saved.files if k.startswith("param.")}
  )
# conv_mode "patches" (auto_LiRPA's default) keeps a conv neuron's coefficients on its receptive
# field only; "matrix" stores them over the whole layer, as cbudget does.
model = BoundedModule(
  net, torch.zeros(2, 1, 28, 28), device="cpu", bound_opts={"conv_mode": args.conv_mode}
)


# IBP training: ε ramps linearly over the first two epochs, half clean and half robust loss.
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
steps_per_epoch, batch = len(ytr) // 128, 128
ramp = 2 * steps_per_epoch
start = time.time()
for step in range(0 if args.load else args.train_epochs * steps_per_epoch):
  if step % steps_per_epoch == 0:
    perm = torch.randperm(len(ytr))
  b = perm[(step % steps_per_epoch) * batch : (step % steps_per_epoch + 1) * batch]
  x, y = xtr[b], ytr[b]
  eps = args.eps * min(step / ramp, 1.0)
  out = model(bounded(x, eps))
  loss = nn.functional.cross_entropy(out, y)
  if eps > 0:
    lb, _ = model.compute_bounds(IBP=True, C=spec(y), method=None)
    padded = torch.cat([torch.zeros(lb.size(0), 1), lb], 1)
    loss = 0.5 * loss + 0.5 * nn.functional.cross_entropy(-padded, torch.zeros_like(y))
  opt.zero_grad()
  loss.backward()
  opt.step()
if not args.load:
  print(f"{args.net}: trained {args.train_epochs} epochs with IBP in {time.time() - start:.0f} s")

model.eval()
x_all, y_all = xte[: args.num_examples], yte[: args.num_examples]
times, lower = [], None
with torch.no_grad():
  for _ in range(args.repeats):
    t, parts = time.perf_counter(), []
    for i in range(0, args.num_examples, args.batch):
      x, y = x_all[i : i + args.batch], y_all[i : i + args.batch]
      model(bounded(x, args.eps))
      lb, _ = model.compute_bounds(C=spec(y), method="backward", bound_upper=False)
      parts.append(lb)
    times.append(time.perf_counter() - t)
    lower = torch.cat(parts).numpy()
  logits = net(x_all)
  assert torch.allclose(logits, model(x_all), atol=1e-5), "BoundedModule and net disagree"
  clean = float((logits.argmax(1) == y_all).float().mean())
seconds = statistics.median(times)
print(
  f"auto_LiRPA full CROWN ({args.conv_mode}), {args.net}, ε {args.eps}, {args.num_examples} images in batches of "
  f"{args.batch}: {seconds:.2f} s (median of {args.repeats}), "
  f"{args.num_examples / seconds:.1f} images/s; clean {clean:.3f}, "
  f"certified {float((lower > 0).all(1).mean()):.3f}"
)
np.savez(
  args.out,
  net=args.net,
  eps=args.eps,
  batch=args.batch,
  images=x_all.numpy().transpose(0, 2, 3, 1),  # NHWC, as cbudget's models take them
  labels=y_all.numpy(),
  logits=logits.numpy(),  # to check that cbudget reads the weights right
  lower=lower,
  seconds=seconds,
  **{f"param.{k}": v.detach().numpy() for k, v in net.state_dict().items()},
)
