"""A run's plan: what the run trains, written once into RUN/plan.json before any trial starts;
Ray-free and torch-free.

The plan is the trials (each trial x repeat as one entry: its name, place in the report's
tables, resources and config) with the digests of the inputs they train on (datasets, weight
files), and the trials skipped with the reason. It is what `--resume` continues: a resumed run
trains its plan, and a resume whose command line would plan anything else is refused in one
line naming the options, so a resumed run can never silently mix two configurations. It is
also where the result rows of skipped trials come from (`raycnn.experiment`). JSON, not a
pickle: reading a run folder never runs code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from raycnn import storage
from raycnn.errors import ResultsError, RunError

PLAN_FILE = "plan.json"

# A config field that differs between the saved plan and a resume's, as the option that sets it.
OPTION_OF = {"epochs": "--epochs", "max_train_samples": "--max-train-samples", "budget": "--quick/--epochs",
             "precision": "--precision", "seed": "--seed", "synthetic": "--synthetic", "weights": "--weights",
             "num_threads": "--cpus-per-trial"}
# Fields a resume may change: where things are, not what is trained. A --weights file is the
# same file wherever it is now when its sha256 (the plan's inputs) is the same.
FREE = {"data_dir", "checkpoint_every", "weights"}
# Entry fields beside the config that decide the results.
DECIDING = {"cpus": "--cpus-per-trial", "gpus": "--gpus-per-trial"}


@dataclass
class Plan:
    """The trials of a run (`entries`: dicts, one per trial and repeat) and the digests of their
    inputs (`inputs`: key -> sha256 of a dataset or weights file)."""
    entries: list[dict]
    inputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"entries": self.entries, "inputs": self.inputs}, indent=1, allow_nan=True) + "\n"


def entries(trials: list, repeats: int, skipped: dict[str, str] | None = None) -> list[dict]:
    """Plan entries for `trials` (raycnn.suites.Trial) x `repeats`: repeat r trains with seed
    + r; a trial named in `skipped` carries the reason it is not trained."""
    skipped = skipped or {}
    out = []
    for t in trials:
        for r in range(repeats):
            entry = {"name": t.name, "suite": t.suite, "table": t.table, "row": t.row, "column": t.column,
                     "order": t.order, "report_acc": t.report_acc, "repeat": r, "gpus": t.gpus_per_trial,
                     "cpus": t.cpus_per_trial, "config": t.config.to_dict() | {"seed": t.config.seed + r}}
            out.append(entry | ({"skipped": skipped[t.name]} if t.name in skipped else {}))
    return json.loads(json.dumps(out))      # as plan.json holds them (tuples as lists), to compare like with like


def path(run_dir: str | Path | storage.Place) -> storage.Place:
    return storage.resolve(run_dir) / PLAN_FILE


def write(run_dir: str | Path | storage.Place, plan: Plan) -> None:
    path(run_dir).write_text(plan.to_json())


def read(run_dir: str | Path | storage.Place) -> Plan:
    """The run's plan; ResultsError in one line if it is missing or unreadable."""
    try:
        doc = json.loads(path(run_dir).read_text())
        return Plan(list(doc["entries"]), dict(doc.get("inputs", {})))
    except FileNotFoundError:
        raise ResultsError(f"{run_dir} has no {PLAN_FILE}: not a run folder raycnn made") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResultsError(f"cannot read {path(run_dir)}: {e}") from None


def key(entry: dict) -> tuple[str, int]:
    return entry["name"], entry["repeat"]


def differences(saved: Plan, new: Plan) -> list[str]:
    """What a resume's plan changes against the saved one, as the options that would do it
    (sorted, no repeats); [] when it trains exactly the saved plan."""
    old_entries, new_entries = {key(e): e for e in saved.entries}, {key(e): e for e in new.entries}
    found = set()
    if set(old_entries) != set(new_entries):
        names = {k[0] for k in old_entries} ^ {k[0] for k in new_entries}
        found.add("the trials (suite or --filter)" if names else "--repeats")
    for k in set(old_entries) & set(new_entries):
        old, cur = old_entries[k], new_entries[k]
        found |= {opt for field_name, opt in DECIDING.items() if old.get(field_name) != cur.get(field_name)}
        found |= {OPTION_OF.get(f, f"{f} (the suite file)") for f in set(old["config"]) | set(cur["config"])
                  if f not in FREE and old["config"].get(f) != cur["config"].get(f)}
        if bool(old.get("skipped")) != bool(cur.get("skipped")) or \
                bool(old["config"].get("weights")) != bool(cur["config"].get("weights")):
            found.add("--weights")
    found |= {"--weights (another file)" if k == "weights" else f"--data-dir (other {k} data)"
              for k in set(saved.inputs) & set(new.inputs) if saved.inputs[k] != new.inputs[k]}
    return sorted(found)


def check_resume(saved: Plan, new: Plan) -> None:
    """RunError in one line if a resume would train anything but the saved plan."""
    changed = differences(saved, new)
    if changed:
        raise RunError(f"--resume with other options than the run started with would change its results: "
                       f"{', '.join(changed)}; resume with the run's own options (its plan.json) or start a new run")
