"""Custom relaxations (the README example runs here, verbatim) and the unsupported-primitive error."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbudget.bounds as cb

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
  """The python code block that follows ``<!-- marker -->`` in the README."""
  text = README.read_text()
  match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
  assert match, f"README has no python block after <!-- {marker} -->"
  return match.group(1)


def test_readme_custom_relaxation_example_runs_and_is_sound():
  namespace = {}
  exec(compile(readme_block("custom-relaxation-example"), "README.md", "exec"), namespace)
  f, params, box, bounds = (namespace[k] for k in ("f", "params", "box", "bounds"))
  pts = jax.random.uniform(
    jax.random.key(0), (500,) + box.lower.shape, minval=box.lower, maxval=box.upper
  )
  ys = jax.vmap(lambda x: f(params, x))(pts)
  assert np.all(ys >= bounds.lower - 1e-5) and np.all(ys <= bounds.upper + 1e-5)
  # The private registry was used: the default one is untouched.
  assert "softplus" not in cb.DEFAULT_REGISTRY


def test_unsupported_primitive_names_it_and_points_to_registration():
  f = lambda p, x: jnp.sin(x @ p)
  box = cb.Box.from_budget(jnp.ones((2, 3)) * 0.5, 0.1)
  with pytest.raises(cb.UnsupportedPrimitiveError, match=r"primitive 'sin'.*register_activation"):
    cb.ibp(f)(jnp.ones((3, 2)), box)


def test_unsupported_inside_named_function_says_where():
  def my_gate(x):
    return jnp.where(x > 0, x, 0.0)  # an input-dependent select: no sound rule without help

  f = lambda p, x: jax.jit(my_gate)(x @ p)
  box = cb.Box.from_budget(jnp.ones((2, 3)) * 0.5, 0.1)
  with pytest.raises(cb.UnsupportedPrimitiveError, match=r"'gt'.*my_gate"):
    cb.crown(f)(jnp.ones((3, 2)), box)
  # Registering the named function fixes it (a private registry keeps the default clean).
  rules = cb.DEFAULT_REGISTRY.copy()
  cb.register_activation("my_gate", lambda l, u, op: (op(l), op(u)), registry=rules)
  b = cb.crown(f, registry=rules)(jnp.ones((3, 2)), box)
  assert np.all(b.lower <= b.upper)


def test_registering_twice_needs_override():
  rules = cb.DEFAULT_REGISTRY.copy()
  with pytest.raises(ValueError, match="already registered"):
    cb.register_interval(jax.lax.max_p, lambda a, b: a, registry=rules)


def test_box_from_budget_errors():
  x = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match="non-negative"):
    cb.Box.from_budget(x, -0.1)
  with pytest.raises(ValueError, match="does not broadcast"):
    cb.Box.from_budget(x, jnp.ones((3,)))
  b = cb.Box.from_budget(x + 0.5, jnp.full((2, 4, 4, 1), 0.7))
  assert float(b.lower.min()) == 0.0 and float(b.upper.max()) == 1.0  # intersected with [0, 1]


def test_spec_shape_mismatch_is_a_clear_error():
  f = lambda p, x: x @ p
  box = cb.Box.from_budget(jnp.ones((2, 3)) * 0.5, 0.1)
  with pytest.raises(ValueError, match=r"spec must have shape \[N, S, K\]"):
    cb.crown(f)(jnp.ones((3, 4)), box, jnp.ones((3, 1, 4)))


def test_box_that_does_not_fit_the_model_is_a_clear_error():
  f = lambda p, x: x.reshape(x.shape[0], -1) @ p
  box = cb.Box.from_budget(jnp.full((2, 5, 5, 1), 0.5), 0.1)
  with pytest.raises(ValueError, match=r"box's shape \(2, 5, 5, 1\).*match the model's input"):
    cb.ibp(f)(jnp.ones((16, 3)), box)
