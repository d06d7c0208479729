"""The figure of one searched cell, for the report page (`raycnn.report`): three panels.

- Parallel coordinates of the samples: an axis per searched field (log-scaled where the space
  is log-uniform, a choice's values in order) and one for the metric; a line per sample,
  coloured by its metric and drawn thicker the more ASHA rungs it passed.
- The learning curves of the rung survivors (the samples ASHA let past its first rung): the
  metric per epoch, the rungs as dotted lines.
- The metric against lr, each sample at its last epoch, the cell's own lr (the report's) marked.

Figure + Agg canvas as in `raycnn.plots`; matplotlib is imported where a figure is drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycnn import space
from raycnn.plots import _canvas

METRIC_LABELS = {"val_acc": "validation accuracy (%)", "val_loss": "validation loss"}
SCALE = {"val_acc": 100.0, "val_loss": 1.0}        # what the axis shows per unit of the metric
SIZE = (12.0, 3.8)                                 # inches; 1080 pixels wide at the page's 90 dpi
CMAP = "viridis"


@dataclass
class SearchFigure:
    """One searched cell: its plan (`raycnn.search` cell, with the metric), its sample rows and
    their epoch rows."""
    cell: dict
    samples: pd.DataFrame
    epochs: pd.DataFrame

    @property
    def title(self) -> str:
        return f"{self.cell['name']}: {len(self.samples)} samples"

    @property
    def caption(self) -> str:
        metric = METRIC_LABELS[self.cell["metric"]]
        return (f"{self.cell['name']}: the search's samples in parallel coordinates (a line per sample, coloured by "
                f"its {metric} at its last epoch, thicker for each ASHA rung passed); the {metric} per epoch of "
                f"the samples that passed the first rung (rungs dotted); and the {metric} against lr, the cell's "
                f"own lr dashed")

    def _value(self, frame: pd.DataFrame) -> np.ndarray:
        return frame["metric_value"].to_numpy(dtype=float) * SCALE[self.cell["metric"]]

    def draw(self):
        """The matplotlib Figure of the three panels."""
        fig = _canvas(SIZE)
        grid = fig.add_gridspec(1, 3, width_ratios=[2.2, 1, 1])
        value = self._value(self.samples)
        finite = value[np.isfinite(value)]
        lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
        from matplotlib import colormaps
        from matplotlib.colors import Normalize
        norm = Normalize(lo, hi if hi > lo else lo + 1)
        colour = lambda v: colormaps[CMAP](norm(v)) if math.isfinite(v) else "lightgray"
        self._parallel(fig.add_subplot(grid[0]), value, colour)
        self._survivors(fig.add_subplot(grid[1]), colour)
        self._against_lr(fig.add_subplot(grid[2]), value, colour)
        fig.suptitle(self.title, fontsize="large")
        return fig

    def _axes(self) -> list[tuple[str, space.Domain]]:
        return list(space.from_json(self.cell["space"]).items())

    def _parallel(self, ax, value: np.ndarray, colour) -> None:
        axes = self._axes()
        names = [k for k, _ in axes] + [self.cell["metric"]]
        finite = value[np.isfinite(value)]
        lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
        order = np.argsort(np.nan_to_num(value, nan=-np.inf))        # the best drawn last, on top
        for i in order:
            row = self.samples.iloc[i]
            ys = [_position(row[k], d) for k, d in axes] + [_span(value[i], lo, hi)]
            ax.plot(range(len(names)), ys, color=colour(value[i]), linewidth=0.8 + 1.2 * row["rung"], alpha=0.85)
        for x, (k, d) in enumerate(axes):
            ax.axvline(x, color="black", linewidth=0.6)
            ends = _ends(d)
            ax.annotate(ends[0], (x, -0.04), ha="center", va="top", fontsize="x-small")
            ax.annotate(ends[1], (x, 1.04), ha="center", va="bottom", fontsize="x-small")
        ax.axvline(len(axes), color="black", linewidth=0.6)
        ax.annotate(f"{lo:.3g}", (len(axes), -0.04), ha="center", va="top", fontsize="x-small")
        ax.annotate(f"{hi:.3g}", (len(axes), 1.04), ha="center", va="bottom", fontsize="x-small")
        ax.set_xticks(range(len(names)), [*names[:-1], METRIC_LABELS[self.cell["metric"]]], fontsize="small")
        ax.set_yticks([])
        ax.set_ylim(-0.12, 1.12)
        ax.set_xlim(-0.3, len(axes) + 0.3)
        ax.set_title("samples, parallel coordinates", fontsize="medium")

    def _survivors(self, ax, colour) -> None:
        scale = SCALE[self.cell["metric"]]
        first = self.cell["rungs"][0] if self.cell["rungs"] else math.inf
        shown = self.samples[self.samples["epochs_done"] > first]
        for _, row in shown.iterrows():
            curve = self.epochs[self.epochs["sample"] == row["sample"]].sort_values("epoch")
            ax.plot(curve["epoch"], curve[self.cell["metric"]] * scale, marker=".", linewidth=1.2,
                    color=colour(row["metric_value"] * scale), label=f"sample {row['sample']}")
        for m in self.cell["rungs"]:
            ax.axvline(m, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(METRIC_LABELS[self.cell["metric"]])
        ax.set_title(f"rung survivors ({len(shown)})", fontsize="medium")
        ax.grid(alpha=0.3)
        if not len(shown):
            ax.text(0.5, 0.5, "no sample passed the first rung", ha="center", va="center", transform=ax.transAxes)

    def _against_lr(self, ax, value: np.ndarray, colour) -> None:
        lr = self.samples["lr"].to_numpy(dtype=float)
        ax.scatter(lr, value, c=[colour(v) for v in value], s=18 + 18 * self.samples["rung"].to_numpy(),
                   edgecolors="black", linewidths=0.4)
        domain = dict(self._axes()).get("lr")
        if domain is not None and domain.kind == "loguniform":
            ax.set_xscale("log")
            ax.set_xlim(*domain.values)          # the whole range searched, in decades
            ax.xaxis.set_minor_formatter("")
        ax.axvline(self.cell["config"]["lr"], color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("lr")
        ax.set_ylabel(METRIC_LABELS[self.cell["metric"]])
        ax.set_title("at the last epoch, against lr", fontsize="medium")
        ax.grid(alpha=0.3)


def _position(v, d: space.Domain) -> float:
    """Where a sampled value sits on its axis, 0 (low end) to 1 (high end)."""
    if d.kind == "choice":
        keys = [space.encode(c) for c in d.values]
        return keys.index(space.encode(v)) / max(1, len(keys) - 1) if space.encode(v) in keys else math.nan
    lo, hi = d.values
    if d.kind == "loguniform":
        return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (v - lo) / (hi - lo)


def _span(v: float, lo: float, hi: float) -> float:
    return 0.5 if hi <= lo else (v - lo) / (hi - lo)


def _ends(d: space.Domain) -> tuple[str, str]:
    if d.kind == "choice":
        return str(d.values[0]), str(d.values[-1])
    return f"{d.values[0]:.3g}", f"{d.values[1]:.3g}"


def figures(doc: dict, samples: pd.DataFrame, epochs: pd.DataFrame) -> list[SearchFigure]:
    """One SearchFigure per cell of a search plan that has samples."""
    out = []
    for cell in doc["cells"]:
        mine = samples[samples["name"] == cell["name"]].reset_index(drop=True) if len(samples) else samples
        if len(mine):
            out.append(SearchFigure(cell | {"metric": doc["settings"]["metric"]}, mine,
                                    epochs[epochs["name"] == cell["name"]]))
    return out
