"""How raycnn prints a table: rich on a terminal, tab-separated text on a pipe or in a file.

One rule for every table the `raycnn` command prints. The key column (a trial name, a row of the
report) is never truncated: on a terminal that is too narrow, the columns listed in `drop` go
first (in that order), then rich folds the remaining ones. When stdout is not a terminal, each
table is a header line and one line per row, tab-separated, so grep, cut and awk work on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Per column: one space of padding either side plus its share of the border.
COLUMN_CHROME = 3


@dataclass
class Sheet:
    """A table to print: column headers, rows of cells (text, or (text, rich style)), the
    column that must stay whole (`key`), and the columns to drop first when space is short."""
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    title: str = ""
    caption: str = ""
    key: int = 0
    drop: tuple[str, ...] = ()
    justify: dict[str, str] = field(default_factory=dict)


def _text(cell) -> str:
    return cell[0] if isinstance(cell, tuple) else str(cell)


def _width(sheet: Sheet, i: int) -> int:
    return max([len(sheet.columns[i])] + [len(_text(r[i])) for r in sheet.rows]) + COLUMN_CHROME


def fitted(sheet: Sheet, width: int) -> list[int]:
    """Indices of the columns shown at `width` characters: all of them if they fit at their
    natural widths, else without the `drop` columns, one at a time in order, until they do."""
    keep = list(range(len(sheet.columns)))
    for name in sheet.drop:
        if sum(_width(sheet, i) for i in keep) + 1 <= width:
            break
        if name in sheet.columns and sheet.columns.index(name) != sheet.key:
            keep.remove(sheet.columns.index(name))
    return keep


def rich_table(sheet: Sheet, width: int) -> Table:
    """The sheet as a rich Table for a terminal `width` characters wide."""
    keep = fitted(sheet, width)
    table = Table(title=sheet.title or None, caption=sheet.caption or None, title_justify="left")
    for i in keep:
        name = sheet.columns[i]
        if i == sheet.key:
            table.add_column(name, no_wrap=True, min_width=_width(sheet, i) - COLUMN_CHROME, style="bold")
        else:
            table.add_column(name, overflow="fold", justify=sheet.justify.get(name, "left"))
    for row in sheet.rows:
        table.add_row(*(Text(*row[i]) if isinstance(row[i], tuple) else Text(str(row[i])) for i in keep))
    return table


def plain(sheet: Sheet) -> str:
    """The sheet as tab-separated lines: a header line, then one line per row (no title)."""
    clean = [[" ".join(_text(c).replace("\t", " ").split()) for c in row] for row in [sheet.columns, *sheet.rows]]
    return "".join("\t".join(row) + "\n" for row in clean)


def emit(console: Console, sheets: list[Sheet]) -> None:
    """Print the sheets: rich tables on a terminal; otherwise tab-separated text, the tables
    separated by a blank line."""
    if console.is_terminal:
        for sheet in sheets:
            console.print(rich_table(sheet, console.width))
        return
    console.file.write("\n".join(plain(s) for s in sheets))
    console.file.flush()
