"""Outputs never overlap inputs, and ``--overwrite`` replaces only what our commands wrote
(``qlora_trainer.io.check_output``, shared by merge, combine, eval and export)."""

from __future__ import annotations

import pytest

from qlora_trainer.errors import QloraError
from qlora_trainer.io import OUTPUT_MARKER, check_output, mark_output


def test_output_overlapping_an_input_is_refused(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    for out, how in [(adapter, "is"), (adapter / "merged", "lies inside"), (tmp_path / "run", "contains")]:
        with pytest.raises(QloraError, match=rf"^--output: {out} {how} the input {adapter}; writing there would "
                                             rf"destroy what is being read: choose an output outside the inputs$"):
            check_output(out, [adapter], overwrite=True)
    check_output(tmp_path / "run" / "merged", [adapter], overwrite=False)  # a sibling is fine


def test_overwrite_replaces_only_our_outputs(tmp_path):
    user_file, user_dir, ours, empty = tmp_path / "notes.txt", tmp_path / "mine", tmp_path / "ours", tmp_path / "e"
    user_file.write_text("x")
    user_dir.mkdir()
    (user_dir / "weights.bin").write_text("x")
    ours.mkdir()
    mark_output(ours, "merge")
    empty.mkdir()
    with pytest.raises(QloraError, match="already exists; pass --overwrite"):
        check_output(ours, [], overwrite=False)
    with pytest.raises(QloraError, match=rf"^--output: {user_file} is a file, not an output of qlora-trainer"):
        check_output(user_file, [], overwrite=True)
    with pytest.raises(QloraError, match=rf"^--output: {user_dir} was not written by qlora-trainer \(no "
                                         rf"{OUTPUT_MARKER}\); --overwrite replaces only our own outputs"):
        check_output(user_dir, [], overwrite=True)
    check_output(ours, [], overwrite=True)
    check_output(empty, [], overwrite=True)


def test_result_files_are_written_into_a_directory_unless_they_are_someone_elses(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    (d / "step-000003").mkdir()  # in-training results beside: fine
    check_output(d, [], overwrite=True, files=("summary.json",))
    (d / "summary.json").write_text("{}")
    with pytest.raises(QloraError, match=r"holds summary.json, not written by qlora-trainer"):
        check_output(d, [], overwrite=True, files=("summary.json",))
    mark_output(d, "eval")
    check_output(d, [], overwrite=True, files=("summary.json",))
