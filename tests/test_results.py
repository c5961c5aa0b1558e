"""CSV + Markdown results tables."""

from __future__ import annotations

import numpy as np
import pytest

from come_rl.results import append_rows, read_rows, write_markdown_table


def test_append_creates_header_and_keeps_column_order(tmp_path) -> None:
    csv_path = tmp_path / "results" / "table.csv"
    append_rows(csv_path, [{"method": "base", "lpips": 0.209, "steps": 20}])
    append_rows(csv_path, [{"lpips": 0.097, "method": "come", "ssim": np.float32(0.5)},
                           {"method": "stm", "steps": 5}])
    columns, rows = read_rows(csv_path)
    assert columns == ["method", "lpips", "steps", "ssim"]
    assert rows == [
        {"method": "base", "lpips": "0.209", "steps": "20", "ssim": ""},
        {"method": "come", "lpips": "0.097", "steps": "", "ssim": "0.5"},
        {"method": "stm", "lpips": "", "steps": "5", "ssim": ""},
    ]
    assert csv_path.read_text().splitlines()[0] == "method,lpips,steps,ssim"
    assert [p.name for p in csv_path.parent.iterdir()] == ["table.csv"]  # no temp files left


def test_floats_round_trip_exactly_and_text_with_commas_survives(tmp_path) -> None:
    csv_path = tmp_path / "t.csv"
    append_rows(csv_path, [{"name": 'a, "quoted" name', "value": 1 / 3}])
    _, rows = read_rows(csv_path)
    assert rows[0]["name"] == 'a, "quoted" name'
    assert float(rows[0]["value"]) == 1 / 3


def test_markdown_table(tmp_path) -> None:
    csv_path = tmp_path / "t.csv"
    append_rows(csv_path, [{"method": "base", "lpips": 0.20912345, "steps": 20},
                           {"method": "a|b", "lpips": float("nan"), "steps": 3}])
    md_path = write_markdown_table(csv_path, title="Memory Maze")
    assert md_path == tmp_path / "t.md"
    assert md_path.read_text() == (
        "# Memory Maze\n\n"
        "| method | lpips | steps |\n"
        "|---|---|---|\n"
        "| base | 0.2091 | 20 |\n"
        "| a\\|b | nan | 3 |\n"
    )
    other = write_markdown_table(csv_path, tmp_path / "x" / "other.md", float_format=".2f")
    assert "| base | 0.21 | 20 |" in other.read_text()


def test_bad_input_is_explained(tmp_path) -> None:
    with pytest.raises(TypeError, match="list of dicts"):
        append_rows(tmp_path / "t.csv", {"a": 1})
    with pytest.raises(TypeError, match="row 1"):
        append_rows(tmp_path / "t.csv", [{"a": 1}, [1, 2]])
    with pytest.raises(ValueError, match="column name"):
        append_rows(tmp_path / "t.csv", [{"": 1}])
    with pytest.raises(FileNotFoundError, match="append_rows first"):
        write_markdown_table(tmp_path / "missing.csv")
    append_rows(tmp_path / "t.csv", [{"a": 1.5}])
    with pytest.raises(ValueError):
        write_markdown_table(tmp_path / "t.csv", float_format="%%bad")


def test_write_table_replaces_the_whole_table(tmp_path):
    from come_rl.results import read_rows, write_table

    csv_path = tmp_path / "t.csv"
    write_table(csv_path, [{"a": 1, "b": 2.5}], title="T")
    write_table(csv_path, [{"a": 3}])
    columns, rows = read_rows(csv_path)
    assert columns == ["a"] and rows == [{"a": "3"}]
    assert "| 3 |" in (tmp_path / "t.md").read_text()
    assert not list(tmp_path.glob(".*staging"))
