"""The defaults of ``plum run``: a TOML file of run-configuration sections plus ``[run]``.

The packaged ones live in ``plumrec/configs/`` (``amazon.toml``: the settings
chosen on Amazon Beauty, each with the comparison that chose it); a path to
another ``.toml`` or ``.json`` file of the same layout works too. Sections:

- ``run``: ``collaborative_sids`` (bool), ``item_attributes`` (``"none"``,
  ``"auto"`` or a path) and ``budget`` (the shares of ``--budget-minutes``
  for ``cpt``, ``sft`` and ``sasrec``);
- ``model``: ``preset`` and ``sid_init_scale``;
- ``sid``: :class:`~plumrec.sid.SIDConfig` fields and ``codebook_sizes``, ``epochs``;
- ``cpt``, ``sft``, ``sasrec``: the training sections of
  :mod:`plumrec.pipeline.config` (without ``steps``: the budget or
  ``--steps`` sets them), each with ``warmup_steps``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from plumrec.pipeline.config import read_config_file
from plumrec.pipeline.settings import TRAIN_STAGES

__all__ = ["PACKAGED", "load_defaults"]

PACKAGED = "amazon"  # the default of `plum run --config`
_REQUIRED = {"run": ("collaborative_sids", "item_attributes", "budget"), "model": ("preset", "sid_init_scale"),
             "sid": ("codebook_sizes", "epochs"), **{stage: ("warmup_steps",) for stage in TRAIN_STAGES}}


def load_defaults(config: str = PACKAGED) -> dict:
    """The defaults of ``config``: the name of a packaged file (``amazon``) or a path. ``ValueError``
    naming what is missing or unknown."""
    packaged = resources.files("plumrec") / "configs" / f"{config}.toml"
    if packaged.is_file():
        with resources.as_file(packaged) as path:
            d = read_config_file(path)
    elif Path(config).is_file():
        d = read_config_file(config)
    else:
        names = sorted(p.name.removesuffix(".toml") for p in (resources.files("plumrec") / "configs").iterdir()
                       if p.name.endswith(".toml"))
        raise ValueError(f"{config!r} must be a packaged config ({', '.join(names)}) or an existing file")
    for section, keys in _REQUIRED.items():
        missing = [k for k in keys if k not in d.get(section, {})]
        if missing:
            raise ValueError(f"{config}: section [{section}] must set {missing}")
    budget = d["run"]["budget"]
    if sorted(budget) != sorted(TRAIN_STAGES) or not all(isinstance(v, (int, float)) and v > 0
                                                         for v in budget.values()):
        raise ValueError(f"{config}: [run.budget] must give a share > 0 to each of {list(TRAIN_STAGES)}, got {budget}")
    unknown = sorted(set(d) - set(_REQUIRED))
    if unknown:
        raise ValueError(f"{config}: unknown sections {unknown}; known: {sorted(_REQUIRED)}")
    return d
