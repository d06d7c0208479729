"""What a trial's epochs amount to: the one rule that turns epoch metrics into a trial's
status and headline accuracy, used by `fit` after every epoch; torch-free."""
from __future__ import annotations

import math
from typing import Any


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def outcome(history: list[dict]) -> dict:
    """What a trial's epoch metrics amount to; `fit` reports it with every epoch, and the
    result rows are what the last report said.

    status: ok (every epoch trained, or early stopping ended it) | diverged | running (no last
    epoch yet). best_epoch: the epoch of the highest selection accuracy (validation where the
    epochs carry one, else test), best_test_acc its test accuracy. final_test_acc, the headline,
    is the test accuracy of the model the trial reports, from epoch reported_epoch: the last
    epoch's, as the report did, except after early stopping, which reports the best epoch's
    (its weights are best.pt). epochs_done is the epoch it stopped at, early_stopped says
    whether patience ran out first."""
    nan = math.nan
    if not history:
        return {"status": "running", "early_stopped": False, "final_test_acc": nan, "reported_epoch": -1,
                "best_test_acc": nan, "best_epoch": -1, "epochs_done": 0, "images_per_s": nan}
    last = history[-1]
    key = "val_acc" if any(_finite(m.get("val_acc")) for m in history) else "test_acc"
    best = max(history, key=lambda m: m[key] if _finite(m.get(key)) else -math.inf)
    stopped = last.get("status") == "stopped"
    reported = best if stopped else last
    trained = [m["images_per_s"] for m in history if _finite(m.get("images_per_s"))]
    return {
        "status": {"stopped": "ok"}.get(last.get("status"), last.get("status")),
        "early_stopped": stopped,
        "final_test_acc": reported.get("test_acc", nan), "reported_epoch": reported.get("epoch", -1),
        "best_test_acc": best.get("test_acc", nan), "best_epoch": best.get("epoch", -1),
        "epochs_done": last.get("epoch", 0),
        "images_per_s": sum(trained) / len(trained) if trained else nan,
    }
