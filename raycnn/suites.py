"""Suites: the report's grid as data, read from TOML files (the bundled ones ship in raycnn/bundled/).

A suite file has four parts, all optional but one source of trials:

    [suite]      name, description, cpus_per_trial, gpus_per_trial, and `table` (the default
                 report-table title for trials that do not say)
    [defaults]   TrainConfig fields shared by every trial of the file
    [[axes]]     name, role (table | row | column) and values: each value a table with a `label`
                 (goes into the trial name), a `title` (the report's wording for that table,
                 row or column) and TrainConfig fields. The product of all axes makes trials
                 named SUITE/label1/label2/...
    [report]     the report's published accuracy (percent) of axis-made trials, by trial name
    [[trials]]   explicit trials: `name` (SUITE/ is prefixed), `table`, `row`, `column`,
                 `report` (percent), optional `gpus_per_trial`, and TrainConfig fields
    [search]     what `raycnn search` tries for the suite's cells (see raycnn.space)

Every key is checked: a mistake names the file and the key.
"""
from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from raycnn import space
from raycnn.config import TrainConfig
from raycnn.errors import ConfigError, SuiteError

BUNDLED = Path(__file__).resolve().parent / "bundled"    # package data: found after any install
# Why a pretrained cell is empty without ImageNet weights (its row's status, its table cell).
NEEDS_WEIGHTS = "needs ImageNet weights (--weights FILE)"
CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
SUITE_KEYS = {"name", "description", "cpus_per_trial", "gpus_per_trial", "table"}
TRIAL_KEYS = {"name", "table", "row", "column", "report", "gpus_per_trial"}
AXIS_KEYS = {"name", "role", "values"}
AXIS_ROLES = ("table", "row", "column")


@dataclass(frozen=True)
class Trial:
    """One configuration of the report: its config, where it sits in the report's tables and
    the accuracy the report published for it (a fraction; NaN where the report has none)."""
    name: str
    suite: str
    config: TrainConfig
    table: str
    row: str
    column: str
    report_acc: float
    order: int
    gpus_per_trial: float
    cpus_per_trial: int


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    trials: list[Trial] = field(default_factory=list)
    search: space.Search | None = None      # its [search] table, if it declares one


def bundled() -> dict[str, Path]:
    """The suites shipped with the package, by name."""
    return {p.stem: p for p in sorted(BUNDLED.glob("*.toml"))}


def resolve(name_or_path: str) -> list[Path]:
    """Suite files for a bundled name, `all`, or a path to a TOML file."""
    known = bundled()
    if name_or_path == "all":
        return list(known.values())
    if name_or_path in known:
        return [known[name_or_path]]
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return [path]
    raise SuiteError(f"unknown suite {name_or_path!r}: use one of {', '.join(['all', *known])} or a .toml file")


def read_toml(path: Path, what: str) -> dict:
    """A TOML file's document; SuiteError in one line naming the file where it cannot be read."""
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SuiteError(f"{path}: cannot read {what}: {e}") from None


def load(path: str | Path) -> Suite:
    """Read and check one suite file."""
    path = Path(path)
    doc = read_toml(path, "suite")
    _check_keys(path, "top level", doc, {"suite", "defaults", "axes", "report", "trials", "search"})
    head = doc.get("suite", {})
    _check_keys(path, "[suite]", head, SUITE_KEYS)
    _check_types(path, "[suite]", head, HEAD_TYPES)
    name = head.get("name", path.stem)
    defaults = doc.get("defaults", {})
    _check_keys(path, "[defaults]", defaults, CONFIG_KEYS)
    for part, kind in (("axes", "an array of tables ([[axes]])"), ("trials", "an array of tables ([[trials]])")):
        if not _tables(doc.get(part, [])):
            raise SuiteError(f"{path}: {part} must be {kind}")
    _check_keys(path, "[report]", doc.get("report", {}), set(doc.get("report", {})))
    specs = _axis_trials(path, name, doc) + _explicit_trials(path, name, doc)
    if not specs:
        raise SuiteError(f"{path}: no trials: declare [[axes]] or [[trials]]")
    trials = [_trial(path, name, head, defaults, spec, i) for i, spec in enumerate(specs)]
    seen = set()
    for t in trials:
        if t.name in seen:
            raise SuiteError(f"{path}: trial name {t.name!r} appears twice")
        seen.add(t.name)
    unknown = set(doc.get("report", {})) - seen
    if unknown:
        raise SuiteError(f"{path}: [report] names trials that do not exist: {', '.join(sorted(unknown))}")
    search = space.parse(path, doc["search"]) if "search" in doc else None
    return Suite(name, path, head.get("description", ""), trials, search)


def _tables(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _count(positive: bool):
    """A check for a resource count: a finite number, positive or at least not negative."""
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > 0 if positive else v >= 0))


# What each [suite] key (and a trial's gpus_per_trial) must be: (check, what to say).
HEAD_TYPES = {
    "name": (lambda v: isinstance(v, str) and v and "/" not in v, "a name without '/'"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "table": (lambda v: isinstance(v, str), "a string"),
    "cpus_per_trial": (lambda v: _count(True)(v) and v == int(v), "a positive whole number"),
    "gpus_per_trial": (_count(False), "a number >= 0"),
}
LABEL_TYPES = {"label": (lambda v: isinstance(v, str) and v and "/" not in v, "a name without '/'"),
               "title": (lambda v: isinstance(v, str), "a string"),
               "name": (lambda v: isinstance(v, str) and v, "a string"),
               "table": (lambda v: isinstance(v, str), "a string"), "row": (lambda v: isinstance(v, str), "a string"),
               "column": (lambda v: isinstance(v, str), "a string"), "gpus_per_trial": HEAD_TYPES["gpus_per_trial"]}


def _check_types(path: Path, where: str, table: dict, types: dict) -> None:
    for key, (ok, what) in types.items():
        if key in table and not ok(table[key]):
            raise SuiteError(f"{path}: {where}: {key} must be {what}, got {table[key]!r}")


def _check_keys(path: Path, where: str, table: Any, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise SuiteError(f"{path}: {where} must be a table")
    bad = sorted(set(table) - allowed)
    if bad:
        raise SuiteError(f"{path}: {where}: unknown key {bad[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _axis_trials(path: Path, suite: str, doc: dict) -> list[dict]:
    """The product of the axes, as trial specs (meta keys + config keys)."""
    axes = doc.get("axes", [])
    for i, axis in enumerate(axes):
        _check_keys(path, f"axes[{i}]", axis, AXIS_KEYS)
        if axis.get("role") not in AXIS_ROLES or not axis.get("values") or not _tables(axis["values"]):
            raise SuiteError(f"{path}: axes[{i}] ({axis.get('name', '?')}): needs role in {AXIS_ROLES} and "
                             f"values, an array of tables")
        for v in axis["values"]:
            _check_keys(path, f"axes[{i}] value {v.get('label', '?')!r}", v, CONFIG_KEYS | {"label", "title"})
            _check_types(path, f"axes[{i}] value {v.get('label', '?')!r}", v, LABEL_TYPES)
            if "label" not in v:
                raise SuiteError(f"{path}: axes[{i}]: every value needs a label")
    report = doc.get("report", {})
    specs = []
    for combo in itertools.product(*(a["values"] for a in axes)) if axes else []:
        spec = {"name": "/".join(v["label"] for v in combo)}
        for axis, value in zip(axes, combo):
            spec[axis["role"]] = value.get("title", value["label"])
            spec.update({k: v for k, v in value.items() if k in CONFIG_KEYS})
        full = f"{suite}/{spec['name']}"
        if full in report:
            spec["report"] = report[full]
        specs.append(spec)
    return specs


def _explicit_trials(path: Path, suite: str, doc: dict) -> list[dict]:
    specs = doc.get("trials", [])
    for i, spec in enumerate(specs):
        _check_keys(path, f"trials[{i}] ({spec.get('name', '?')})", spec, CONFIG_KEYS | TRIAL_KEYS)
        _check_types(path, f"trials[{i}]", spec, LABEL_TYPES)
        if "name" not in spec:
            raise SuiteError(f"{path}: trials[{i}]: needs a name")
    return specs


def _trial(path: Path, suite: str, head: dict, defaults: dict, spec: dict, order: int) -> Trial:
    name = f"{suite}/{spec['name']}"
    config = {**defaults, **{k: v for k, v in spec.items() if k in CONFIG_KEYS}}
    try:
        cfg = TrainConfig.from_dict(config).validate()
    except (ConfigError, TypeError) as e:
        raise SuiteError(f"{path}: trial {name}: {e}") from None
    report = spec.get("report", math.nan)
    if not isinstance(report, (int, float)) or not (math.isnan(report) or 0 <= report <= 100):
        raise SuiteError(f"{path}: trial {name}: report must be a percentage, got {report!r}")
    return Trial(name=name, suite=suite, config=cfg, table=spec.get("table", head.get("table", suite)),
                 row=spec.get("row", spec["name"]), column=spec.get("column", "Accuracy (%)"),
                 report_acc=report / 100, order=order,
                 gpus_per_trial=float(spec.get("gpus_per_trial", head.get("gpus_per_trial", 0.0))),
                 cpus_per_trial=int(head.get("cpus_per_trial", 1)))


def with_overrides(trial: Trial, **changes: Any) -> Trial:
    """A copy of `trial` with TrainConfig fields changed (e.g. epochs from the command line)."""
    try:
        return replace(trial, config=replace(trial.config, **changes).validate())
    except ConfigError as e:
        raise SuiteError(f"trial {trial.name}: {e}") from None
