"""α-CROWN (Xu et al., ICLR 2021): full CROWN with its relaxations optimised by gradient ascent.

CROWN fixes one relaxation per non-affine node, e.g. the lower line ``a z`` of an unstable ReLU with
``a`` in {0, 1}. Any ``a`` in [0, 1] is sound, and the best one differs per bound being computed, so
α-CROWN keeps one set of parameters per *bounded quantity* (each row of each intermediate layer
bounded by full CROWN, and each output/spec row) and per example, and maximises the bounds by
projected gradient ascent (an optax optimiser, then clipping to each rule's ``alpha_range``).

Which nodes are optimisable is the rule's business (the registry protocol, see
``registry.ActivationRule``): a rule with ``alpha_init``/``relax_with``/``alpha_range`` takes part;
others keep their fixed relaxation. Built in: ReLU and every ``max``/``min`` kink, ``abs``,
``leaky_relu`` (the supporting line at the kink) and ``sigmoid``/``tanh`` (the tangent points).

Soundness and monotonicity: each iteration is an ordinary CROWN pass with other (sound) relaxations,
so every iterate is a sound bound, and the result is the best iterate per example and row. The first
pass is CROWN itself (the parameters start at CROWN's relaxations), so the result is never looser
than ``crown(fn, "crown")``. Intermediate bounds are intersected with IBP and with the tightest
bounds met so far (all are sound bounds of the same quantity).

Gradients: the optimised parameters are constants to ``jax.grad`` (they are the result of a
search, like CROWN's slope choice); the returned bound is differentiable in ``params`` and the box
through every pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from cbudget.bounds._src.api import (
  DEFAULT_REGISTRY,
  _check_inputs,
  _identity_rows,
  _nan_where_invalid,
  _output_box,
  _spec_rows,
  check_crown_options,
)
from cbudget.bounds._src.box import Box
from cbudget.bounds._src.graph import build_graph
from cbudget.bounds._src.propagate import Propagator
from cbudget.bounds._src.registry import Registry


def _initial_alphas(prop: Propagator) -> dict:
  """``{node index: alpha [P, N, ...]}`` for every node whose rule offers an optimisable
  relaxation, at CROWN's relaxation (computed from the bounds ``prop`` holds)."""
  found = {}
  for index, node in enumerate(prop.graph.nodes):
    init = getattr(node.rule, "alpha_init", None) if node.bounded else None
    if init is None:
      continue
    alpha = init([prop.env[i] for i in node.inputs], node.params, node.evaluate, prop.options)
    if alpha is not None:
      found[index] = lax.stop_gradient(jnp.asarray(alpha, prop.env[prop.input_id].dtype))
  return found


def _rows_alphas(prop, target, node_alphas, num_rows) -> dict:
  """Each optimisable node upstream of ``target`` gets its parameters once per row."""
  found = {}
  for k in prop.upstream_nodes(target):
    if k in node_alphas:
      a = node_alphas[k]
      found[k] = jnp.broadcast_to(a[:, None], (a.shape[0], num_rows) + a.shape[1:])
  return found


def alpha_crown(
  fn: Callable,
  iterations: int = 20,
  lr: float = 0.1,
  *,
  optimizer: optax.GradientTransformation | None = None,
  optimize_intermediate: bool = True,
  relu_lower_slope: str = "adaptive",
  chunk_size: int | None = None,
  memory_limit: int | None = None,
  need_upper: bool = True,
  sparse: bool = True,
  registry: Registry | None = None,
):
  """α-CROWN bounds: ``alpha_crown(fn)(params, box, spec=None) -> Box``, like :func:`crown`.

  * ``iterations`` gradient steps of ``optimizer`` (default ``optax.adam(lr)``) on the sum of the
    lower bounds of every row and example (the parameters of different examples and rows are
    separate, so this is each one's own ascent, except that a layer's parameters serve all the
    rows bounded through it). ``iterations=0`` is full CROWN.
  * ``optimize_intermediate``: optimise the relaxations used for the intermediate bounds too (one
    set of parameters per intermediate row; memory grows with ``rows x upstream neurons`` per
    example). ``False`` keeps full CROWN's intermediate bounds and optimises the output rows' only.
  * ``relu_lower_slope``: CROWN's choice the parameters start from (see :func:`crown`).
  * ``chunk_size``/``memory_limit``: as for full CROWN, the (intermediate row, example) pairs one
    backward pass carries; the parameters of each chunk of rows go with it. The output rows (the
    spec, or every output) are done in one pass.
  * ``need_upper=False``: lower bounds only (upper bounds +inf), half the work.
  * ``sparse``: as for full CROWN, intermediate rows only for the elements CROWN's bounds leave
    inexact (unstable neurons); the set is fixed by the first pass (CROWN's) for all iterations.

  The result is sound and, for every example and row, at least as tight as full CROWN's
  (``crown(fn, "crown", relu_lower_slope=...)``).
  """
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}")
  check_crown_options(relu_lower_slope, chunk_size, memory_limit)
  if optimizer is None:
    if not lr > 0:
      raise ValueError(f"lr must be positive, got {lr}")
    optimizer = optax.adam(lr)
  registry = DEFAULT_REGISTRY if registry is None else registry
  options = {"relu_lower_slope": relu_lower_slope}

  def chunk_of(prop):  # as full CROWN: fixed before the forward pass
    if memory_limit is None:
      return chunk_size
    return prop.chunk_for_memory(memory_limit)

  @functools.wraps(fn)
  def bound(params, box, spec=None) -> Box:
    box, spec = _check_inputs(box, spec)
    graph, leaves = build_graph(fn, params, jax.ShapeDtypeStruct(box.shape, box.dtype), registry)
    out_id = graph.outputs[0]

    # Pass 0: full CROWN, which also fixes the starting parameters.
    prop0 = Propagator(graph, leaves, box, options)
    chunk = chunk_of(prop0)
    first = prop0.forward(chunk, sparse)
    out = _output_box(prop0, out_id)
    if spec is None:
      rows = _identity_rows(out.shape, out.dtype)
    else:
      rows = _spec_rows(spec, out.shape, out.dtype)
    num_rows = rows.shape[0]
    if need_upper:
      rows = jnp.concatenate([rows, -rows])
    best = prop0.backward(out_id, rows)  # [rows, N]: CROWN's bounds

    node_alphas = _initial_alphas(prop0)
    interm_alphas = {}
    if optimize_intermediate:
      for i in first:
        c, num_chunks = prop0.row_chunks(i, chunk)
        found = _rows_alphas(prop0, i, node_alphas, c * num_chunks)
        if found:
          interm_alphas[i] = found
    out_alphas = _rows_alphas(prop0, out_id, node_alphas, rows.shape[0])
    alphas = (interm_alphas, out_alphas)
    if iterations > 0 and jax.tree.leaves(alphas):
      setup = (graph, leaves, box, options, prop0, first, rows, chunk)
      best = _optimise(setup, alphas, best, optimizer, iterations)
    if need_upper:
      lower, upper = best[:num_rows].T, -best[num_rows:].T
    else:
      lower = best.T
      upper = jnp.full_like(lower, jnp.inf)
    if spec is None:
      return _nan_where_invalid(box, Box(lower.reshape(out.shape), upper.reshape(out.shape)))
    return _nan_where_invalid(box, Box(lower, upper))

  return bound


def _optimise(setup, alphas, best, optimizer, iterations):
  """Projected gradient ascent on the parameters; the best bound per row and example."""
  graph, leaves, box, options, prop0, first, rows, chunk = setup
  needed = {i: need for i, (_, need) in first.items()}
  out_id = graph.outputs[0]
  ranges = {k: graph.nodes[k].rule.alpha_range for k in _node_indices(alphas)}

  def project(tree):
    clip = lambda d: {k: jnp.clip(a, *ranges[k]) for k, a in d.items()}
    interm, out = tree
    return {i: clip(d) for i, d in interm.items()}, clip(out)

  def evaluate(tree, floor):
    interm_alphas, out_alphas = tree
    prop = Propagator(graph, leaves, box, options)
    if interm_alphas:
      refined = prop.forward(chunk, False, interm_alphas, floor, needed)
      floor = {i: b for i, (b, _) in refined.items()}
    else:  # the intermediate bounds are pass 0's: reuse its values and linearisations
      prop.env = dict(prop0.env)
      prop._linear = dict(prop0._linear)
    return prop.backward(out_id, rows, alphas=out_alphas), floor

  def step(carry, _):
    tree, opt_state, best, floor = carry

    def objective(t):
      lower, new_floor = evaluate(t, floor)
      return -jnp.sum(lower), (lower, new_floor)

    (_, (lower, floor)), grads = jax.value_and_grad(objective, has_aux=True)(tree)
    updates, opt_state = optimizer.update(grads, opt_state, tree)
    tree = lax.stop_gradient(project(optax.apply_updates(tree, updates)))
    return (tree, lax.stop_gradient(opt_state), jnp.maximum(best, lower), floor), None

  floor0 = {i: b for i, (b, _) in first.items()}
  opt_state = lax.stop_gradient(optimizer.init(alphas))
  (tree, _, best, floor), _ = lax.scan(
    step, (alphas, opt_state, best, floor0), None, length=iterations
  )
  lower, _ = evaluate(tree, floor)  # the last step's parameters
  return jnp.maximum(best, lower)


def _node_indices(alphas) -> set[int]:
  interm, out = alphas
  return set(out).union(*[set(d) for d in interm.values()])
