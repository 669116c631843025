"""Outputs never overlap inputs, and ``--overwrite`` replaces only what our commands wrote
(``qlora_trainer.io.check_output``, shared by merge, combine, eval and export's directories); a
single-file output is replaced only with ``--overwrite`` and only when the command's own check says
it wrote it (``check_output_file``); files are written aside and renamed (``atomic_file``)."""

from __future__ import annotations

import errno
import os

import pytest

from qlora_trainer.errors import DiskFullError, QloraError
from qlora_trainer.io import OUTPUT_MARKER, atomic_file, check_output, check_output_file, mark_output, starts_with


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


# Single-file outputs (export's .gguf, generate --output, memory-table --chart, memory --snapshot)

def _is_ours(path):
    return path.read_bytes().startswith(b"OURS")


def test_file_output_overlapping_an_input_is_refused(tmp_path):
    prompts, adapter = tmp_path / "prompts.txt", tmp_path / "adapter"
    prompts.write_text("hi\n")
    adapter.mkdir()
    for out, given, how in [(prompts, prompts, "is"), (adapter / "out.jsonl", adapter, "lies inside")]:
        with pytest.raises(QloraError, match=rf"^--output: {out} {how} the input {given}; .* choose an output "
                                             rf"outside the inputs$"):
            check_output_file(out, [given], overwrite=True, ours=lambda p: True, what="x")
    assert prompts.read_text() == "hi\n"


def test_file_output_is_replaced_only_with_overwrite_and_only_when_ours(tmp_path):
    new, ours, mine, empty = tmp_path / "new.bin", tmp_path / "ours.bin", tmp_path / "mine.bin", tmp_path / "e.bin"
    ours.write_bytes(b"OURS and more")
    mine.write_bytes(b"my thesis")
    empty.write_bytes(b"")
    check_output_file(new, [], overwrite=False, ours=_is_ours, what="x")  # nothing there: fine
    for path in (ours, mine, empty):
        with pytest.raises(QloraError, match=rf"^--out: {path} already exists; pass --overwrite to replace it, or "
                                             rf"choose another path$"):
            check_output_file(path, [], overwrite=False, ours=_is_ours, what="x", option="--out")
    check_output_file(ours, [], overwrite=True, ours=_is_ours, what="x")
    check_output_file(empty, [], overwrite=True, ours=_is_ours, what="x")  # nothing to lose
    with pytest.raises(QloraError, match=rf"^--output: {mine} is not an OURS file; --overwrite replaces only an "
                                         rf"earlier output of qlora-trainer: choose another path \(nothing of yours "
                                         rf"is replaced\)$"):
        check_output_file(mine, [], overwrite=True, ours=_is_ours, what="an OURS file")


def test_file_output_never_replaces_a_directory_a_link_a_fifo_or_an_unreadable_file(tmp_path):
    folder, target = tmp_path / "d.gguf", tmp_path / "t.gguf"
    folder.mkdir()
    target.write_bytes(b"OURS")
    link = tmp_path / "l.gguf"
    link.symlink_to(target)
    fifo = tmp_path / "p.gguf"
    os.mkfifo(fifo)  # reading it to check would hang
    for path, what in [(folder, "a directory"), (link, "a link"), (fifo, "a special file")]:
        with pytest.raises(QloraError, match=rf"^--output: {path} is {what}, not an output of qlora-trainer; "
                                             rf"choose another path \(nothing of yours is replaced\)$"):
            check_output_file(path, [], overwrite=True, ours=_is_ours, what="x")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(QloraError, match="is not x; --overwrite replaces only"):
        check_output_file(target, [], overwrite=True, ours=unreadable, what="x")


def test_starts_with_checks_magic_and_tags(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"GGUF\x03\x00 ... creator: qlora-trainer ...")
    assert starts_with(b"GGUF")(f) and starts_with(b"GGUF", b"qlora-trainer")(f)
    assert not starts_with(b"GGUF", b"someone else")(f) and not starts_with(b"%PDF")(f)


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old, complete")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert out.read_bytes() == b"old, complete" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    with pytest.raises(DiskFullError, match=rf"^no space left on device writing {out};"):
        with atomic_file(out) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert out.read_bytes() == b"old, complete" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
