"""Results tables: append rows to a CSV under `results/` and render it as a Markdown table.

Both files are written atomically (temporary file + rename), so a table being read while a run
appends to it is always complete. Appending rewrites the whole CSV, which is fine for the small
tables this project writes (hundreds of rows).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from come_rl.io_utils import PathLike, atomic_write_text


def read_rows(csv_path: PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV written by `append_rows`; rows map column -> cell text."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"no results table at {str(path)!r}; write one with append_rows first")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        return columns, [dict(row) for row in reader]


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        # round-trips exactly; Markdown rendering does the rounding. float(): numpy's float64 is a float whose repr
        # under numpy 2 is "np.float64(0.5)", which no CSV reader parses as a number
        return repr(float(value))
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _cell_text(value.item())
    return str(value)


def append_rows(csv_path: PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Append `rows` to the CSV at `csv_path`, creating it (and its directory) with a header if needed.

    Column order: the existing header first, then new keys in the order they first appear; rows
    missing a column get an empty cell. Returns the CSV path.
    """
    if isinstance(rows, Mapping):
        raise TypeError("append_rows expects a list of dicts; wrap a single row as [row]")
    rows = list(rows)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"append_rows: row {index} is a {type(row).__name__}, expected a dict column -> value")
        for key in row:
            if not isinstance(key, str) or not key:
                raise ValueError(f"append_rows: row {index} has column name {key!r}; use non-empty strings")
    path = Path(csv_path)
    columns, existing_rows = read_rows(path) if path.is_file() else ([], [])
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in existing_rows:
        writer.writerow({column: row.get(column, "") or "" for column in columns})
    for row in rows:
        writer.writerow({column: _cell_text(row.get(column)) for column in columns})
    atomic_write_text(path, buffer.getvalue())
    return path


def _format_cell(text: str, float_format: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text.replace("|", "\\|")
    if text.strip().lstrip("+-").isdigit():
        return text.strip()  # integers stay as written
    if math.isnan(number) or math.isinf(number):
        return text.strip()
    return format(number, float_format)


def write_markdown_table(csv_path: PathLike, md_path: PathLike | None = None, title: str | None = None,
                         float_format: str = ".4g") -> Path:
    """Render the CSV as a Markdown table at `md_path` (default: same name with `.md`).

    Floats are formatted with `float_format`; integers and text are written as they are. Returns the
    Markdown path.
    """
    columns, rows = read_rows(csv_path)
    if not columns:
        raise ValueError(f"{csv_path} has no header; it is empty or not written by append_rows")
    format(1.0, float_format)  # fail early, with Python's own message, on a bad format spec
    destination = Path(md_path) if md_path is not None else Path(csv_path).with_suffix(".md")
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines.append("| " + " | ".join(column.replace("|", "\\|") for column in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(column) or "", float_format)
                                       for column in columns) + " |")
    atomic_write_text(destination, "\n".join(lines) + "\n")
    return destination


def write_rows(csv_path: PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Replace the CSV at ``csv_path`` by ``rows`` atomically (columns: the union of keys in first-seen order)."""
    path = Path(csv_path)
    staging = path.with_name(f".{path.name}.staging")
    if staging.exists():
        staging.unlink()
    append_rows(staging, rows)
    staging.replace(path)
    return path


def write_table(csv_path: PathLike, rows: Sequence[Mapping[str, Any]], title: str | None = None,
                md_path: PathLike | None = None) -> Path:
    """Replace the table at ``csv_path`` by ``rows`` (CSV + Markdown beside it), each file written atomically.

    For results that a command recomputes as a whole (an evaluation, a benchmark); ``append_rows`` is for logs that
    grow. A crash leaves either the previous table or the new one, never a mix.
    """
    path = write_rows(csv_path, rows)
    write_markdown_table(path, md_path, title=title)
    return path


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a success rate; (0, 1) for no trials."""
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------- open-loop goal-reaching protocol (NWM) tables
PROTOCOL_METRICS = ("ate", "rpe", "final_distance")


def summarize_protocol_rows(rows: Iterable[dict], group_keys: Sequence[str] = ("planner", "world_model")) -> list[dict]:
    """Mean of ATE, RPE, final distance and plan seconds per group (NaN-aware)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in group_keys), []).append(row)
    summary = []
    for key, members in groups.items():
        entry = dict(zip(group_keys, key))
        entry["cases"] = len(members)
        for metric in (*PROTOCOL_METRICS, "plan_seconds"):
            values = [float(m[metric]) for m in members if not math.isnan(float(m[metric]))]
            entry[metric] = float(np.mean(values)) if values else math.nan
        summary.append(entry)
    return summary


def protocol_markdown_table(summary: Sequence[dict], title: str, units: str) -> str:
    """Planners (rows) x world models (columns); each cell "ATE / RPE / final distance"."""
    planners = list(dict.fromkeys(entry["planner"] for entry in summary))
    models = list(dict.fromkeys(entry["world_model"] for entry in summary))
    cells = {(entry["planner"], entry["world_model"]): entry for entry in summary}
    lines = [f"# {title}", "", (f"Cells: ATE / RPE / final distance to the goal (means over cases; {units}); "
                                "lower is better."), "", "| planner | " + " | ".join(models) + " |",
             "|---|" + "---|" * len(models)]
    for planner in planners:
        texts = []
        for model in models:
            entry = cells.get((planner, model))
            texts.append("-" if entry is None else " / ".join(f"{entry[m]:.3f}" for m in PROTOCOL_METRICS))
        lines.append(f"| {planner} | " + " | ".join(texts) + " |")
    lines += ["", "| planner | world model | cases | ATE | RPE | final distance | plan seconds |",
              "|---|---|---|---|---|---|---|"]
    for entry in summary:
        lines.append(f"| {entry['planner']} | {entry['world_model']} | {entry['cases']} | {entry['ate']:.4f} | "
                     f"{entry['rpe']:.4f} | {entry['final_distance']:.4f} | {entry['plan_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def write_protocol_results(rows: Sequence[dict], out_dir: str | Path, name: str, title: str, units: str) -> tuple[Path, Path]:
    """``<out_dir>/<name>.csv`` (every row) and ``<name>.md`` (the table of means), both written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    write_rows(csv_path, rows)
    atomic_write_text(md_path, protocol_markdown_table(summarize_protocol_rows(rows), title, units))
    return csv_path, md_path
