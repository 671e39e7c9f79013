"""Named settings for the paper's comparisons: uniform vs global vs contextual at the same volume.

Each preset has a CPU schedule (what the README's results table ran) and the paper-scale schedule
(``--schedule=paper``, for a GPU/TPU). Flags given on the command line override a preset.
"""

_MODES = ("uniform", "global", "contextual")
_CANVAS_MODES = _MODES + ("oracle",)  # the framed canvases know their true mask: a reference

# Effective volume: budgets cannot buy volume from the part of a box the domain [0, 1] cuts off.
_COMMON = dict(
  model="dm_small",
  generator="coarse",
  method="ibp",
  batch_size=100,
  ramp_fraction=0.5,
  volume="effective",
)
_PLAIN = dict(_COMMON, budget_range="0.25,4", warmup_fraction=0.05, kappa_end=0.0)
# The canvases are harder to learn than the plain datasets: a longer clean warm-up, and half the
# loss stays clean (kappa_end 0.5; with 0, IBP training of uniform budgets collapsed to a constant).
# Their budgets must see a slot's marker: the wide generator (the coarse one cannot, see
# cbudget.models.generators.WideGenerator).
_CANVAS = dict(_COMMON, generator="wide", budget_range="0.1,10", warmup_fraction=0.2, kappa_end=0.5)
_BASE = {
  "mnist": dict(_PLAIN, dataset="mnist"),
  "cifar": dict(_PLAIN, dataset="cifar10"),
  # b·ε₀ < 0.5: wider budgets could forge or erase the frame that marks the labelled slot.
  "mnist_canvas": dict(_CANVAS, dataset="mnist_canvas", eps=0.1, budget_range="0.1,4.9"),
  "cifar_canvas": dict(_CANVAS, dataset="cifar_canvas", eps=2 / 255),
}

# (cpu, paper) schedules.
_SCHEDULES = {
  "mnist": (
    dict(epochs=3),
    dict(epochs=100, model="dm_large", method="crown-ibp", ramp_fraction=0.5),
  ),
  "cifar": (
    dict(epochs=3),
    dict(epochs=160, model="cnn7", method="ibp", augment=True, batch_size=128),
  ),
  "mnist_canvas": (dict(epochs=3), dict(epochs=60, model="dm_large")),
  "cifar_canvas": (dict(epochs=3), dict(epochs=100, model="cnn7")),
}

PRESETS = {}
FAMILY = {}  # preset name -> family (mnist, cifar, mnist_canvas, cifar_canvas)
for _family, _base in _BASE.items():
  _epsilons = {
    "mnist": ((0.3, "0.3"), (0.4, "0.4")),
    "cifar": ((2 / 255, "2_255"), (8 / 255, "8_255"), (16 / 255, "16_255")),
  }.get(_family, ((None, ""),))
  for _eps, _label in _epsilons:
    for _mode in _CANVAS_MODES if _family.endswith("_canvas") else _MODES:
      _name = f"{_family}_{_mode}" + (f"_{_label}" if _label else "")
      _values = dict(_base, budget=_mode)
      if _eps is not None:
        _values["eps"] = _eps
      PRESETS[_name] = _values
      FAMILY[_name] = _family

# The same presets trained with today's methods (cbudget/methods.py), to compare methods x budget
# modes at the same volume: `<preset>_sabr`, `<preset>_mtl-ibp`, `<preset>_ibp-fast` (IBP with
# Shi et al.'s initialisation and warm-up regularisers). λ and α are the methods' defaults, not
# tuned per dataset. `launch.reproduce` runs them only when named (--only).
_METHOD_VARIANTS = {
  "sabr": dict(method="sabr"),
  "mtl-ibp": dict(method="mtl-ibp"),
  "ibp-fast": dict(method="ibp", init="fast", fast_reg=0.5),
}
METHOD_VARIANTS = {}  # preset name -> the method's values (they win over the schedule's method)
for _name in list(PRESETS):
  for _suffix, _values in _METHOD_VARIANTS.items():
    PRESETS[f"{_name}_{_suffix}"] = dict(PRESETS[_name], **_values)
    FAMILY[f"{_name}_{_suffix}"] = FAMILY[_name]
    METHOD_VARIANTS[f"{_name}_{_suffix}"] = _values

DEMO = dict(dataset="shapes", model="dm_small", budget="contextual")


def preset_values(name: str, schedule: str = "cpu") -> dict:
  """Flag values of a preset (``""`` or ``"demo"``: the demo defaults)."""
  if name in ("", "demo"):
    return dict(DEMO)
  if name not in PRESETS:
    raise ValueError(f"unknown --preset={name!r}; choose one of {sorted(PRESETS)} or 'demo'")
  cpu, paper = _SCHEDULES[FAMILY[name]]
  return {**PRESETS[name], **(cpu if schedule == "cpu" else paper), **METHOD_VARIANTS.get(name, {})}


def train_config(name: str, schedule: str = "cpu", **overrides):
  """The :class:`cbudget.train.TrainConfig` of a preset, with ``overrides`` (e.g. workdir)."""
  from cbudget.train import TrainConfig
  from launch.common import parse_range

  values = {**preset_values(name, schedule), **overrides}
  if isinstance(values.get("budget_range"), str):
    values["budget_range"] = parse_range(values["budget_range"])
  return TrainConfig(**values)
