"""Data files and directories: one rule for a directory (one file type; with split-named files every
data file belongs to a split), the files used are logged, CSV rows are counted, blank files refused.
Each bad case is one ``error:`` line from ``data-check`` naming the file (and line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
ROW = {"instruction": "add 1 and 2", "input": "", "output": "3"}


def _check(cli_error, path) -> str:
    return cli_error("data-check", DEMO, f"data.path={path}")


def test_directory_mixing_file_types_is_refused_with_the_rule(cli_error, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "b.csv").write_text("instruction,input,output\nx,,y\n")
    (tmp_path / "c.txt").write_text("free text\n")
    (tmp_path / "README.md").write_text("not data")  # unsupported types are ignored
    msg = _check(cli_error, tmp_path)
    assert msg == (f"{tmp_path}: mixes data file types (1 json (a.jsonl); 1 csv (b.csv); 1 text (c.txt)); a "
                   f"directory must hold one type: move the others out or point data.path at one file")


def test_stray_file_beside_split_files_is_refused(cli_error, tmp_path):
    for name in ("train.jsonl", "test.jsonl", "extra.jsonl"):
        (tmp_path / name).write_text(json.dumps(ROW) + "\n")
    msg = _check(cli_error, tmp_path)
    assert msg.startswith(f"{tmp_path}: extra.jsonl belong to no split while other files are named for one")


def test_directory_of_one_type_reads_all_files_and_logs_them(tmp_path, caplog):
    from qlora_trainer.data.sources import load_records

    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text(json.dumps(ROW | {"output": str(i)}) + "\n")
    with caplog.at_level(logging.INFO, "qlora_trainer.data.sources"):
        ds = load_records(str(tmp_path))
    assert sorted(ds["output"]) == ["0", "1", "2"]
    assert "3 json file(s): part-0.jsonl, part-1.jsonl, part-2.jsonl" in caplog.text


@pytest.mark.parametrize("rows,line,fields", [
    ("x,,y\nx,,y,z\n", 3, 4),
    ('x,,y\n"multi\nline",,y\nx,y\n', 5, 2),  # a quoted cell spanning lines: the physical line is named
])
def test_ragged_csv_row_names_its_line(cli_error, tmp_path, rows, line, fields):
    f = tmp_path / "d.csv"
    f.write_text("instruction,input,output\n" + rows)
    assert _check(cli_error, f) == (f"{f}:{line}: row has {fields} fields, the header 3; quote values that "
                                    f"contain commas (\"a, b\") or fix the row")


@pytest.mark.parametrize("name", ["blank.jsonl", "blank.csv", "blank.txt"])
def test_file_of_blank_lines_is_refused(cli_error, tmp_path, name):
    f = tmp_path / name
    f.write_text("\n  \n\n")
    assert _check(cli_error, f) == f"{f}: holds only blank lines, no records; add data or point data.path elsewhere"


def test_missing_eval_file_names_its_key(cli_error, tmp_path):
    msg = cli_error("data-check", DEMO, f"data.eval_path={tmp_path / 'nope.jsonl'}")
    assert msg.startswith(f"{tmp_path / 'nope.jsonl'}: data file not found (data.eval_path; $QLORA_DATA = ")
