"""The batch axis is tracked, never guessed; the inputs are checked, under jax.jit too.

Functions that mix examples must be refused (the backward passes bound every example separately);
functions that keep examples apart on any axis must get sound bounds from every method.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cbudget.bounds as cb

METHODS = {
  "ibp": cb.ibp,
  "crown-ibp": cb.crown,
  "crown": lambda f: cb.crown(f, "crown"),
  "crown (chunked)": lambda f: cb.crown(f, "crown", chunk_size=3),
}
W = np.random.default_rng(0).normal(size=(3, 4))  # K = N = 3 for a batch of 3
PERM = jnp.array([2, 0, 1])


def _dense(x):
  return x @ W.T  # [N, 3]: square when N = 3, so sizes cannot tell the axes apart


# Each mixes examples: reorders, reduces, contracts or accumulates along the batch axis.
MIXING = {
  "flip": lambda p, x: jnp.flip(x, 0),
  "permute": lambda p, x: x[PERM],
  "matmul from the left": lambda p, x: jnp.eye(3)[PERM] @ x,
  "cumsum": lambda p, x: jnp.cumsum(x, 0),
  "transpose of a square": lambda p, x: jax.nn.relu(_dense(x).T),
  "contract a features-first value": lambda p, x: jax.nn.relu(_dense(x).T) @ jnp.eye(3)[PERM],
  "sum over the batch": lambda p, x: jnp.broadcast_to(_dense(x).sum(0), (3, 3)),
  "roll": lambda p, x: jnp.roll(x, 1, axis=0),
  "reverse slice": lambda p, x: x[::-1],
  "concatenate halves": lambda p, x: jnp.concatenate([x[1:], x[:1]], axis=0),
  "reshape across examples": lambda p, x: x.reshape(4, 3),
  "outer product": lambda p, x: jnp.einsum("ni,mi->nm", x, jax.nn.relu(x)),
  "minus the batch mean": lambda p, x: x - x.mean(0),
}

# Each keeps examples apart, the batch sometimes on another axis than the leading one.
PER_EXAMPLE = {
  "features-first layer": lambda p, x: jax.nn.relu(jnp.einsum("kd,nd->kn", W, x)).T,
  "features-first twice": lambda p, x: (
    (jnp.einsum("jk,kn->jn", W[:, :3], jax.nn.relu(jnp.einsum("kd,nd->kn", W, x)))).T
  ),
  "moveaxis and back": lambda p, x: (
    jnp.moveaxis(jax.nn.relu(jnp.moveaxis(x.reshape(3, 2, 2), 0, 2)), 2, 0).reshape(3, 4) @ W.T
  ),
  "dot_general batch dims": lambda p, x: jnp.einsum(
    "nij,nj->ni", jnp.broadcast_to(W[:, :2], (3, 3, 2)), jax.nn.relu(x[:, :2])
  ),
  "per-example mean": lambda p, x: jax.nn.relu(x - x.mean(1, keepdims=True)) @ W.T,
  "slice and concat features": lambda p, x: jnp.concatenate(
    [jax.nn.relu(x[:, 2:]), jnp.tanh(x[:, :2])], axis=1
  ),
  "flip features": lambda p, x: jax.nn.relu(jnp.flip(x, 1)) @ W.T,
}


def _box(seed, n=3, width=0.5):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(seed), (n, 4), jnp.float64)
    eps = width * jax.random.uniform(jax.random.key(seed + 1), (n, 4), jnp.float64)
    return cb.Box(x - eps, x + eps)


def _assert_sound(f, box, bounds, samples=3000):
  keys = jax.random.split(jax.random.key(7), 2)
  t = jax.random.uniform(keys[0], (samples,) + box.shape, jnp.float64)
  corners = jax.random.bernoulli(keys[1], 0.5, (samples // 4,) + box.shape).astype(jnp.float64)
  points = box.lower + (box.upper - box.lower) * jnp.concatenate([t, corners])
  values = jax.vmap(lambda z: f(None, z))(points)
  tol = 1e-9 * (1 + jnp.abs(bounds.lower))
  assert bool(jnp.all(values >= bounds.lower - tol))
  if np.all(np.isfinite(bounds.upper)):
    assert bool(jnp.all(values <= bounds.upper + 1e-9 * (1 + jnp.abs(bounds.upper))))


@pytest.mark.parametrize("name", sorted(MIXING))
def test_functions_that_mix_examples_are_refused_by_every_method(name):
  with jax.enable_x64(True):
    box = _box(0)
    for method_name, method in METHODS.items():
      with pytest.raises(cb.BatchMixingError, match="independently|leading axis"):
        method(MIXING[name])(None, box)


@settings(max_examples=6, deadline=None)
@given(name=st.sampled_from(sorted(PER_EXAMPLE)), seed=st.integers(0, 1000))
def test_per_example_functions_on_any_axis_are_sound(name, seed):
  with jax.enable_x64(True):
    box = _box(seed)
    f = PER_EXAMPLE[name]
    for method in METHODS.values():
      _assert_sound(f, box, method(f)(None, box))


def test_features_first_layout_matches_the_batch_first_one():
  # The same function written with the batch leading and trailing: the bounds must agree.
  with jax.enable_x64(True):
    box = _box(3)
    first = lambda p, x: jax.nn.relu(jnp.einsum("kd,nd->kn", W, x)).T
    leading = lambda p, x: jax.nn.relu(x @ W.T)
    for method in METHODS.values():
      a, b = method(first)(None, box), method(leading)(None, box)
      np.testing.assert_allclose(a.lower, b.lower, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(a.upper, b.upper, rtol=1e-12, atol=1e-12)


def test_the_error_names_the_primitive_and_where_it_is():
  @jax.jit
  def block(h):
    return jnp.flip(h, 0)

  with pytest.raises(cb.BatchMixingError, match=r"'rev' inside jit\[name=block\]"):
    cb.crown(lambda p, x: block(jax.nn.relu(x)))(None, _box(0))


def test_a_single_example_batch_still_refuses_mixing_operations():
  with pytest.raises(cb.BatchMixingError):
    cb.ibp(lambda p, x: x.sum(0, keepdims=True))(None, _box(0, n=1))


# -- inputs under jax.jit ---------------------------------------------------------------------------

NET = lambda p, x: jax.nn.relu(x @ p["w"]) @ p["v"]
PARAMS = {
  "w": jax.random.normal(jax.random.key(1), (4, 5)),
  "v": jax.random.normal(jax.random.key(2), (5, 3)),
}
ENTRY_POINTS = {
  "ibp": lambda p, box: cb.ibp(NET)(p, box).lower,
  "crown": lambda p, box: cb.crown(NET)(p, box).lower,
  "full crown": lambda p, box: cb.crown(NET, "crown")(p, box).lower,
  "crown_ibp": lambda p, box: cb.crown_ibp(NET)(p, box).crown.lower,
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_a_concrete_box_closed_over_by_a_jitted_function(name):
  box = cb.Box.from_budget(jax.random.uniform(jax.random.key(3), (4, 4)), 0.1)
  entry = ENTRY_POINTS[name]
  grads = jax.jit(jax.grad(lambda p: entry(p, box).sum()))(PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(jax.jit(lambda p: entry(p, box))(PARAMS), entry(PARAMS, box), 1e-5)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_invalid_boxes_under_jit_give_nan_for_their_example_only(name):
  entry = ENTRY_POINTS[name]
  x = jax.random.uniform(jax.random.key(4), (4, 4))
  good = cb.Box.from_budget(x, 0.1)
  expected = entry(PARAMS, good)
  empty = good._replace(lower=good.lower.at[1, 2].set(good.upper[1, 2] + 0.5))
  infinite = good._replace(upper=good.upper.at[3, 0].set(jnp.inf))
  nan = good._replace(lower=good.lower.at[0, 0].set(jnp.nan))
  jitted = jax.jit(entry)
  for bad, example in ((empty, 1), (infinite, 3), (nan, 0)):
    got = np.asarray(jitted(PARAMS, bad))
    assert np.all(np.isnan(got[example]))
    others = [i for i in range(4) if i != example]
    np.testing.assert_allclose(got[others], np.asarray(expected)[others], rtol=1e-5)


def test_negative_budgets_under_jit_certify_nothing():
  x = jax.random.uniform(jax.random.key(5), (4, 4), minval=0.2, maxval=0.8)
  lower = jax.jit(lambda eps: cb.crown(NET)(PARAMS, cb.Box.from_budget(x, eps)).lower)
  eps = jnp.full((4, 4), 0.1).at[2, 1].set(-0.05)
  got = np.asarray(lower(eps))
  assert np.all(np.isnan(got[2])) and np.all(np.isfinite(got[[0, 1, 3]]))


def test_invalid_concrete_boxes_are_clear_errors():
  good = cb.Box.from_budget(jnp.full((2, 3), 0.5), 0.1)
  with pytest.raises(ValueError, match=r"empty at index \[1, 2\]"):
    cb.ibp(lambda p, x: x)(None, good._replace(lower=good.lower.at[1, 2].set(1.0)))
  with pytest.raises(ValueError, match="non-finite"):
    cb.crown(lambda p, x: x)(None, good._replace(upper=good.upper.at[0, 0].set(jnp.nan)))


# -- extension points ---------------------------------------------------------------------------------


class Cube:
  """A user's rule object written against the BoundRule protocol alone (no ``kind``)."""

  def ibp(self, args, params, evaluate):
    (box,) = args
    return cb.Box(evaluate(box.lower)[0], evaluate(box.upper)[0])  # x**3 is increasing

  def linearize(self, args, params, evaluate, options):
    return None


def test_a_protocol_rule_object_works_in_every_method():
  rules = cb.DEFAULT_REGISTRY.copy()
  rules.register(jax.lax.integer_pow_p, Cube())
  f = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p["w"]) ** 3 @ p["v"])
  box = cb.Box.from_budget(jax.random.uniform(jax.random.key(6), (2, 4)), 0.05)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), PARAMS)
    box64 = cb.Box(box.lower.astype(jnp.float64), box.upper.astype(jnp.float64))
    for method in (cb.ibp, cb.crown, lambda f, registry: cb.crown(f, "crown", registry=registry)):
      bounds = method(f, registry=rules)(params, box64)
      _assert_sound(lambda _, z: f(params, z), box64, bounds)


def test_an_unknown_primitive_needs_a_batch_rule():
  prim = jax.extend.core.Primitive("my_double")
  prim.def_impl(lambda x: 2 * x)
  prim.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  ibp = lambda a: cb.Box(prim.bind(a.lower), prim.bind(a.upper))
  box = cb.Box.from_budget(jnp.full((2, 3), 0.5), 0.1)
  f = lambda p, x: prim.bind(x)
  rules = cb.DEFAULT_REGISTRY.copy()
  cb.register_interval(prim, ibp, registry=rules)
  with pytest.raises(cb.BatchMixingError, match="batch_rule"):
    cb.ibp(f, registry=rules)(None, box)
  cb.register_interval(
    prim, ibp, batch_rule=cb.elementwise_batch_rule, registry=rules, override=True
  )
  np.testing.assert_allclose(cb.ibp(f, registry=rules)(None, box).upper, 2 * box.upper)


def test_crown_ibp_equals_its_two_parts():
  box = cb.Box.from_budget(jax.random.uniform(jax.random.key(8), (4, 4)), 0.1)
  spec = jax.random.normal(jax.random.key(9), (4, 2, 3))
  both = jax.jit(cb.crown_ibp(NET))(PARAMS, box, spec)
  np.testing.assert_allclose(both.ibp.lower, cb.ibp(NET)(PARAMS, box, spec).lower, rtol=1e-6)
  np.testing.assert_allclose(both.ibp.upper, cb.ibp(NET)(PARAMS, box, spec).upper, rtol=1e-6)
  np.testing.assert_allclose(both.crown.lower, cb.crown(NET)(PARAMS, box, spec).lower, rtol=1e-6)
  np.testing.assert_allclose(both.crown.upper, cb.crown(NET)(PARAMS, box, spec).upper, rtol=1e-6)
