"""Data-parallel training on 4 virtual CPU devices equals the single-device step."""

import os
import subprocess
import sys
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOUR_DEVICES = {
  **os.environ,
  "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
  "JAX_PLATFORMS": "cpu",
  "PYTHONPATH": ROOT,
}

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from cbudget import data
    from cbudget.train import TrainConfig, data_parallel, init_state, make_setup, make_train_step
    assert jax.device_count() == 4, jax.devices()
    # mlp: a budget generator and CROWN-IBP; resnet: BatchNorm (a generator there only adds compile
    # time: the batch statistics are the classifier's).
    for model, method, budget in [("mlp", "crown-ibp", "contextual"), ("resnet", "ibp", "uniform")]:
      config = TrainConfig(workdir="unused", model=model, method=method, budget=budget,
                           batch_size=8, steps=4, warmup_fraction=0.0, ramp_fraction=0.0)
      ds = data.load("shapes", "train", num_examples=8)
      x, y = ds.images, ds.labels
      setup = make_setup(config, steps_per_epoch=1)
      state = init_state(setup, config)
      step = make_train_step(setup, config)
      one = jax.devices()[0]
      s1, m1 = step(jax.device_put(state, one), jax.device_put(x, one), jax.device_put(y, one))
      put_batch, put_replicated = data_parallel()
      xb = put_batch(x)
      assert len(xb.sharding.device_set) == 4 and xb.addressable_shards[0].data.shape[0] == 2
      s4, m4 = step(put_replicated(state), xb, put_batch(y))
      for k in ("loss", "robust_loss", "clean_loss", "grad_norm", "certified_error"):
        np.testing.assert_allclose(m1[k], m4[k], rtol=2e-5, atol=1e-6, err_msg=k)
      # Gradients, via Adam's first moment (0.1 * grad after one step), and BatchNorm statistics.
      mu = lambda st: [l for path, l in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]
                       if ".mu" in jax.tree_util.keystr(path)]
      for u, v in zip(mu(s1), mu(s4)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-7, err_msg="grad")
      for u, v in zip(jax.tree.leaves(s1.variables.batch_stats), jax.tree.leaves(s4.variables.batch_stats)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7, err_msg="bn")
      # Updated params, where the gradient is above rounding noise: a conv bias followed by
      # BatchNorm has gradient exactly 0 in exact arithmetic, and Adam's first step moves a
      # parameter by +-lr whatever the size of its (noise) gradient.
      flat = lambda t: jax.tree.leaves(t)
      for g, u, v in zip(mu(s1), flat(s1.variables.params), flat(s4.variables.params)):
        signal = np.abs(np.asarray(g)) > 1e-6
        np.testing.assert_allclose(np.asarray(u)[signal], np.asarray(v)[signal], rtol=1e-5,
                                   atol=1e-6, err_msg="params")
      print(model, method, "loss", float(m1["loss"]), float(m4["loss"]))
    print("SHARDED-OK")
""")


def test_sharded_step_equals_single_device_step():
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT],
    env=FOUR_DEVICES,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDED-OK" in out.stdout


def test_launcher_runs_on_four_virtual_devices(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      f"--workdir={tmp_path}/w",
      "--steps=4",
      "--batch_size=16",
      "--num_train_examples=64",
      "--log_every=2",
    ],
    env=FOUR_DEVICES,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "training on 4 device(s)" in out.stderr
  assert "trained to step 4" in out.stdout
