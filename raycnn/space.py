"""Search spaces as data: what `raycnn search` tries for a cell of the grid; Ray-free and torch-free.

A suite file declares them beside its grid in a `[search]` table, and `raycnn search --space
FILE` replaces that table with the `[search]` table of a file of the user's own:

    [search]
    samples = 12                   # --samples: configurations tried per cell
    budget_runs = 3                # the epochs cap (--budget) as a multiple of one full run of the cell
    grace = 1                      # --grace: epochs every sample trains before ASHA may stop it
    reduction_factor = 3           # ASHA keeps the best 1/3 at each rung
    val_fraction = 0.1             # --val-fraction: held out of the training set, for selection
    repeats = 3                    # --repeats: fresh seeds of the best config's re-run

    [search.space]                 # every cell of the suite
    weight_decay = { loguniform = [1e-6, 1e-2] }
    [search.optimizer.sgd]         # cells with this optimizer, over [search.space]
    lr = { around = 10 }           # log-uniform from lr / 10 to lr * 10: two decades around the cell's own
    momentum = { uniform = [0.0, 0.99] }
    [search.scheduler.multistep]   # cells with this scheduler, over both
    milestones = { choice = [[10, 22], [15, 25]] }

A cell's space is [search.space], then its optimizer's table, then its scheduler's, a later
table's key replacing an earlier one's. A domain is one of DOMAINS; float fields take any,
other fields (whole numbers, lists) only `choice`. Every key is checked when the suite is
read, and every domain's ends against each cell searched (`resolve`), so a mistake is one
line naming the file and the key.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from raycnn.config import OPTIMIZERS, SCHEDULERS, TrainConfig
from raycnn.errors import ConfigError, SuiteError

# Fields a search may vary: the training settings, never what makes the cell the cell (network,
# data, epochs, batch size) nor where or how precisely it runs.
SEARCHABLE = ("lr", "momentum", "weight_decay", "gamma", "milestones", "crop_padding", "flip_p",
              "brightness", "contrast", "saturation", "hue", "backbone_lr", "classifier_lr")
FLOAT_FIELDS = {k for k in SEARCHABLE if isinstance(getattr(TrainConfig(), k), float)}
# [search] settings: name -> (check, what it must be, default).
SETTINGS = {
    "samples": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", 12),
    "budget_runs": (lambda v: _number(v) and v > 0, "a number > 0", 3.0),
    "grace": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", 1),
    "reduction_factor": (lambda v: _number(v) and v > 1, "a number > 1", 3.0),
    "val_fraction": (lambda v: _number(v) and 0 < v < 1, "a fraction in (0, 1)", 0.1),
    "repeats": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", 3),
}
LEVELS = {"space": None, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}    # tables, and what they are keyed by


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bounds(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v) and v[0] < v[1]


@dataclass(frozen=True)
class Domain:
    """One field's range: kind (loguniform | uniform | choice) and its values ([lo, hi], or the
    choices); `around` is resolved against the cell into a loguniform."""
    kind: str
    values: tuple

    def ends(self) -> tuple:
        """The values a domain's extremes give: both bounds, or every choice."""
        return self.values

    def to_json(self) -> dict:
        return {self.kind: list(self.values)}


# What each domain form must be, and the Domain it makes for a cell (its value of the field).
DOMAINS = {
    "around": (lambda v: _number(v) and v > 1, "a factor > 1 (lr / F to lr * F, log-uniform)",
               lambda v, cell: Domain("loguniform", (cell / v, cell * v))),
    "loguniform": (lambda v: _bounds(v) and v[0] > 0, "[lo, hi] with 0 < lo < hi",
                   lambda v, cell: Domain("loguniform", tuple(v))),
    "uniform": (_bounds, "[lo, hi] with lo < hi", lambda v, cell: Domain("uniform", tuple(v))),
    "choice": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of values",
               lambda v, cell: Domain("choice", tuple(v))),
}


@dataclass(frozen=True)
class Search:
    """A suite's `[search]` table, checked: its settings (defaults filled in) and its domain
    tables (level -> key -> field -> raw domain), and the file it came from, for messages."""
    path: Path
    settings: dict
    tables: dict


def parse(path: Path, table: Any) -> Search:
    """Check a `[search]` table of the file at `path`; SuiteError in one line naming the key."""
    where = f"{path}: [search]"
    if not isinstance(table, dict):
        raise SuiteError(f"{where} must be a table")
    allowed = set(SETTINGS) | set(LEVELS)
    for key, value in table.items():
        if key not in allowed:
            raise SuiteError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        if key in SETTINGS and not SETTINGS[key][0](value):
            raise SuiteError(f"{where}: {key} must be {SETTINGS[key][1]}, got {value!r}")
    tables = {"space": {"": _fields(path, "[search.space]", table.get("space", {}))}}
    for level in ("optimizer", "scheduler"):
        sub = table.get(level, {})
        if not isinstance(sub, dict):
            raise SuiteError(f"{where}: {level} must be a table of tables ([search.{level}.NAME])")
        for name, fields in sub.items():
            if name not in LEVELS[level]:
                raise SuiteError(f"{where}: unknown {level} {name!r} in [search.{level}.{name}] "
                                 f"(choose from {', '.join(LEVELS[level])})")
        tables[level] = {name: _fields(path, f"[search.{level}.{name}]", fields) for name, fields in sub.items()}
    settings = {k: table.get(k, default) for k, (_, _, default) in SETTINGS.items()}
    return Search(path, settings, tables)


def _fields(path: Path, where: str, fields: Any) -> dict:
    """One table of domains, checked key by key."""
    if not isinstance(fields, dict):
        raise SuiteError(f"{path}: {where} must be a table of field = {{ domain }}")
    for key, domain in fields.items():
        if key not in SEARCHABLE:
            raise SuiteError(f"{path}: {where}: {key} cannot be searched (searchable: {', '.join(SEARCHABLE)})")
        if not isinstance(domain, dict) or len(domain) != 1:
            raise SuiteError(f"{path}: {where}: {key} must be one domain, e.g. {{ uniform = [0.0, 0.9] }}, "
                             f"got {domain!r}")
        (kind, value), = domain.items()
        if kind not in DOMAINS:
            raise SuiteError(f"{path}: {where}: {key}: unknown domain {kind!r} (choose from {', '.join(DOMAINS)})")
        if kind != "choice" and key not in FLOAT_FIELDS:
            raise SuiteError(f"{path}: {where}: {key} is not a float field: only {{ choice = [...] }} fits it")
        if not DOMAINS[kind][0](value):
            raise SuiteError(f"{path}: {where}: {key}: {kind} must be {DOMAINS[kind][1]}, got {value!r}")
    return fields


def load(path: str | Path) -> Search:
    """A `--space FILE`: a TOML file with a `[search]` table, checked as a suite's is."""
    from raycnn.suites import read_toml
    path = Path(path)
    doc = read_toml(path, "search space")
    if set(doc) != {"search"}:
        raise SuiteError(f"{path}: a search-space file holds one [search] table, got {', '.join(sorted(doc)) or 'nothing'}")
    return parse(path, doc["search"])


def resolve(search: Search, name: str, config: TrainConfig) -> dict[str, Domain]:
    """The space of one cell (its name and config): the tables that apply, `around` against the
    cell's value, every end checked as a config of the cell (SuiteError naming the key)."""
    raw, origin = {}, {}
    for level, table in (("space", search.tables["space"][""]),
                         ("optimizer", search.tables["optimizer"].get(config.optimizer, {})),
                         ("scheduler", search.tables["scheduler"].get(config.scheduler, {}))):
        for key, domain in table.items():
            raw[key] = domain
            origin[key] = "[search.space]" if level == "space" else f"[search.{level}.{getattr(config, level)}]"
    if not raw:
        raise SuiteError(f"{search.path}: [search] declares nothing to search for {name} "
                         f"(optimizer {config.optimizer}, scheduler {config.scheduler})")
    out = {}
    for key, domain in raw.items():
        (kind, value), = domain.items()
        out[key] = DOMAINS[kind][2](value, getattr(config, key))
        for end in out[key].ends():
            try:
                apply(config, {key: end})
            except (ConfigError, TypeError) as e:
                raise SuiteError(f"{search.path}: {origin[key]}: {key} = {end!r} does not fit {name}: {e}") from None
    return out


def apply(config: TrainConfig, values: dict) -> TrainConfig:
    """The config with searched values set, validated (ConfigError if they do not fit)."""
    plain = TrainConfig.from_dict({**config.to_dict(), **values})
    return replace(config, **{k: getattr(plain, k) for k in values}).validate()


def encode(value: Any) -> str:
    """A choice as the searcher sees it: JSON text (Optuna's choices must be scalars; a
    milestones list is not)."""
    return json.dumps(value)


def decode(sampled: dict, space: dict[str, Domain]) -> dict:
    """A searcher's sample as config values: choices back from their JSON text."""
    return {k: json.loads(v) if space[k].kind == "choice" else v for k, v in sampled.items()}


def from_json(doc: dict) -> dict[str, Domain]:
    """A cell's space as search.json keeps it ({field: {kind: values}})."""
    return {k: Domain(kind, tuple(values)) for k, d in doc.items() for kind, values in d.items()}
