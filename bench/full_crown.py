"""Full-CROWN certification rate, after compilation: on a trained run, or on auto_LiRPA's weights.

  python -m bench.full_crown --workdir W [--num_examples 100] [--memory_gib G] [--repeats 2]
  python -m bench.full_crown --reference R.npz [--memory_gib G] [--repeats 3]

``--workdir``: certifies the first ``num_examples`` test images of a trained run as one batch at the
run's ε₀ (learned budgets use the run's generator). ``--reference``: the file that
``bench/reference/auto_lirpa_full_crown.py`` writes (a net auto_LiRPA trained, its test images and
auto_LiRPA's full-CROWN bounds); the same weights and images are certified here in batches of the
same size, so the two rates are for the same job, and the certificates are compared per example.
``memory_limit`` is what ``launch.evaluate`` sets. Prints XLA's planned temporary memory, seconds
per pass and images per second (compilation excluded), and the certified fraction.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import NETS, device_description, trained_run_and_test_images
from cbudget.bounds import Box, crown
from cbudget.evaluate import DEFAULT_CROWN_MEMORY_GIB
from cbudget.objective import margin_spec


def flax_variables_from_torch(reference) -> dict:
  """cbudget's PlainCNN variables from a PyTorch ``Sequential`` state dict (conv, ReLU, conv, ReLU,
  flatten, linear, ReLU, linear): OIHW kernels become HWIO, and the first dense layer's inputs are
  reordered from PyTorch's (C, H, W) flattening to Flax's (H, W, C)."""
  torch_keys = sorted(
    {k.split(".")[1] for k in reference.files if k.startswith("param.")}, key=int
  )  # the Sequential's indices of the layers with weights, in order
  w = [reference[f"param.{i}.weight"] for i in torch_keys]
  b = [reference[f"param.{i}.bias"] for i in torch_keys]
  channels = w[1].shape[0]
  dense0 = w[2].reshape(w[2].shape[0], channels, -1)  # [out, C, H*W]
  dense0 = dense0.transpose(0, 2, 1).reshape(w[2].shape[0], -1)  # [out, H*W*C]
  params = {
    "Conv_0": {"kernel": w[0].transpose(2, 3, 1, 0), "bias": b[0]},
    "Conv_1": {"kernel": w[1].transpose(2, 3, 1, 0), "bias": b[1]},
    "Dense_0": {"kernel": dense0.T, "bias": b[2]},
    "Dense_1": {"kernel": w[3].T, "bias": b[3]},
  }
  return {"params": jax.tree.map(jnp.asarray, params)}


def from_reference(path: str):
  """``(apply, variables, box, spec, batch, reference)`` for the job of an auto_LiRPA file."""
  reference = np.load(path)
  net = NETS[str(reference["net"])][0]()
  variables = flax_variables_from_torch(reference)
  images = jnp.asarray(reference["images"])
  logits = net.apply(variables, images)
  error = float(jnp.max(jnp.abs(logits - reference["logits"])))
  if error > 1e-3:
    raise ValueError(f"the weights were read wrongly: logits differ from PyTorch's by {error:.3g}")
  box = Box.from_budget(images, float(reference["eps"]))
  spec = margin_spec(jnp.asarray(reference["labels"]), 10)
  return net.apply, variables, box, spec, int(reference["batch"]), reference


def main():
  parser = argparse.ArgumentParser()
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir")
  source.add_argument("--reference")
  parser.add_argument("--num_examples", type=int, default=100)
  parser.add_argument("--memory_gib", type=float, default=DEFAULT_CROWN_MEMORY_GIB)
  parser.add_argument(
    "--chunk_size", type=int, help="(row, example) pairs per backward pass, instead of memory_gib"
  )
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument(
    "--pack_rows",
    choices=["on", "off"],
    default="on",
    help="pack the unstable neurons of all examples into the passes (crown's pack_rows)",
  )
  parser.add_argument(
    "--patches",
    choices=["on", "off"],
    default="on",
    help="keep convolutional rows on their receptive fields (crown's patches)",
  )
  args = parser.parse_args()
  if args.workdir:
    config, model, run_variables, x, labels = trained_run_and_test_images(
      args.workdir, args.num_examples
    )
    apply, variables = model._apply, model.classifier_variables(run_variables)
    box = model.box(x, model.budgets(run_variables.params, x, config.eps))
    spec = margin_spec(labels, model.num_classes)
    batch, reference, name = args.num_examples, None, config.model
  else:
    apply, variables, box, spec, batch, reference = from_reference(args.reference)
    name = f"{reference['net']} (auto_LiRPA's weights)"
  num = spec.shape[0]
  memory = int(args.memory_gib * 2**30)
  options = dict(pack_rows=args.pack_rows == "on", patches=args.patches == "on")
  if args.chunk_size:
    bound = crown(apply, "crown", need_upper=False, chunk_size=args.chunk_size, **options)
  else:
    bound = crown(apply, "crown", need_upper=False, memory_limit=memory, **options)
  chunks = [
    (jax.tree.map(lambda a, i=i: a[i : i + batch], box), spec[i : i + batch])
    for i in range(0, num, batch)
  ]
  compiled = {}
  for b, s in chunks:  # one compilation per batch size (the last batch may be smaller)
    if s.shape[0] not in compiled:
      compiled[s.shape[0]] = (
        jax.jit(lambda v, b, s: bound(v, b, s).lower).lower(variables, b, s).compile()
      )
  print(
    f"full CROWN, {name}, {num} images in batches of {batch}, rows packed: {args.pack_rows}, "
    f"patches: {args.patches}, "
    f"on {device_description()}"
  )
  planned = compiled[chunks[0][1].shape[0]].memory_analysis()
  if planned is not None:
    print(f"  planned temporaries {planned.temp_size_in_bytes / 2**30:.2f} GiB")
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    lower = jnp.concatenate(
      [jax.block_until_ready(compiled[s.shape[0]](variables, b, s)) for b, s in chunks]
    )
    times.append(time.perf_counter() - start)
    certified = np.asarray(jnp.all(lower > 0, axis=1))
    print(
      f"  {times[-1]:.2f} s, {num / times[-1]:.2f} images/s, certified {certified.mean():.3f}",
      flush=True,
    )
  if reference is not None:
    theirs = reference["lower"] > 0
    ours_only = int(np.sum(certified & ~theirs.all(1)))
    theirs_only = int(np.sum(theirs.all(1) & ~certified))
    gap = np.asarray(lower) - reference["lower"]
    seconds = statistics.median(times)
    print(
      f"  auto_LiRPA: {float(reference['seconds']):.2f} s, "
      f"{num / float(reference['seconds']):.2f} images/s, certified {theirs.all(1).mean():.3f}; "
      f"rate ratio cbudget / auto_LiRPA {float(reference['seconds']) / seconds:.2f}"
    )
    print(
      f"  certified by cbudget only: {ours_only}, by auto_LiRPA only: {theirs_only}; "
      f"cbudget's margin bound minus auto_LiRPA's: median {np.median(gap):.3g}, "
      f"min {gap.min():.3g}, max {gap.max():.3g}"
    )


if __name__ == "__main__":
  main()
