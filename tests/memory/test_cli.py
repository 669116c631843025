"""``qlora-trainer memory`` / ``memory-table``: exit codes, JSON keys, clean errors."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.cli import main


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_fits_exit_0_and_json_keys(capsys):
    assert main(["memory", "llama-2-7b", "--seq", "1024", "--budget", "24", "--json"]) == 0
    d = _json(capsys)
    assert {"total_gb", "fits", "components", "max_seq_len", "max_batch"} <= set(d)
    assert d["fits"] is True and d["max_batch"] >= 2 and d["max_seq_len"] >= 1024
    assert d["components"]["base_nf4"] == pytest.approx(3.238, abs=1e-3)   # GB
    assert sum(d["components"].values()) < d["total_gb"]


def test_does_not_fit_exit_1(capsys):
    assert main(["memory", "llama-2-70b", "--budget", "24", "--system", "hf", "--r", "64",
                 "--optimizer", "paged_adamw_32bit", "--json"]) == 1
    d = _json(capsys)
    assert d["fits"] is False and d["max_seq_len"] == 0 and d["settings"]["system"] == "hf"


def test_text_output_and_model_dir(tmp_path, capsys):
    qwen = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert main(["memory", str(tmp_path), "--budget", "16"]) == 0
    out = capsys.readouterr().out
    assert "| base_nf4 |" in out and "fits in 16 GB" in out


def test_embeddings_on_cpu_moves_the_table_to_host(capsys):
    """Llama-3.1-70B at 24k tokens: the 128256 x 8192 bf16 table (2.10 GB) leaves the device total
    (x1.04 reserve factor) and joins the pinned host memory."""
    args = ["memory", "llama-3.1-70b", "--seq", "24576", "--budget", "48", "--offload", "--mlp-chunk", "2048",
            "--json"]
    main(args)
    off = _json(capsys)
    main(args + ["--embeddings-on-cpu"])
    on = _json(capsys)
    table = 128256 * 8192 * 2
    assert off["total_gb"] - on["total_gb"] == pytest.approx(1.04 * table / 1e9, abs=2e-3)   # ~2.19 GB
    assert on["host_pinned_gib"] - off["host_pinned_gib"] == pytest.approx(table / 2**30, abs=2e-3)
    assert on["components"]["embeddings"] == 0 and on["settings"]["embeddings_on_cpu"] is True


def test_bad_inputs_exit_2(capsys):
    assert main(["memory", "org/never-downloaded", "--budget", "24"]) == 2
    assert "not downloaded" in capsys.readouterr().err
    assert main(["memory", "llama-2-7b", "--budget", "-1"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["memory", "llama-2-7b", "--budget", "24", "--dropout", "1"]) == 2
    assert "--dropout" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_measure_on_cpu_is_a_one_line_error(capsys):
    assert main(["memory", "tiny", "--budget", "24", "--measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA device") and "\n" not in err


def test_memory_table_json_and_chart(tmp_path, capsys):
    chart = tmp_path / "t.png"
    assert main(["memory-table", "--json", "--chart", str(chart)]) == 0
    d = _json(capsys)
    assert [r["model"] for r in d["rows"]] == ["llama-7b", "llama-13b", "llama-33b", "llama-65b"]
    assert chart.stat().st_size > 1000


@pytest.mark.gpu
def test_measure_on_gpu(capsys):
    assert main(["memory", "tiny", "--seq", "128", "--budget", "24", "--measure", "--json"]) == 0
    assert {r["phase"] for r in _json(capsys)["measured"]} >= {"forward", "backward", "step"}


def test_measure_refuses_hf_system(capsys):
    assert main(["memory", "tiny", "--budget", "24", "--measure", "--system", "hf"]) == 2
    assert "our stack only" in capsys.readouterr().err


@pytest.mark.parametrize("kind", [".png", ".svg", ".pdf"])
def test_chart_replaces_only_an_earlier_chart_and_never_half_writes(tmp_path, cli_error, monkeypatch, kind):
    """``--chart`` over an existing file needs ``--overwrite`` and replaces only a chart memory-table
    drew (its creator tag), never a user's picture; a failing write keeps the old chart."""
    import errno

    import qlora_trainer.io

    mine, chart = tmp_path / f"photo{kind}", tmp_path / f"t{kind}"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n holiday")
    assert cli_error("memory-table", "--chart", mine) == f"--chart: {mine} already exists; pass --overwrite to " \
                                                         f"replace it, or choose another path"
    assert cli_error("memory-table", "--chart", mine, "--overwrite").startswith(
        f"--chart: {mine} is not a chart of memory-table; --overwrite replaces only")
    assert mine.read_bytes() == b"\x89PNG\r\n\x1a\n holiday"
    assert main(["memory-table", "--chart", str(chart)]) == 0
    first = chart.read_bytes()
    assert b"qlora-trainer memory-table" in first

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(qlora_trainer.io.os, "fsync", disk_full)
        assert cli_error("memory-table", "--chart", chart, "--overwrite").startswith(
            f"no space left on device writing {chart};")
    assert chart.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, chart.name])
    assert main(["memory-table", "--chart", str(chart), "--overwrite"]) == 0


def test_snapshot_is_checked_before_measuring(tmp_path, cli_error):
    """``memory --snapshot`` never replaces a user's file (checked before the GPU is looked for) and
    needs ``--measure``."""
    mine = tmp_path / "notes.pickle"
    mine.write_text("mine")
    base = ["memory", "tiny", "--budget", "24", "--measure", "--snapshot", mine]
    assert cli_error(*base) == f"--snapshot: {mine} already exists; pass --overwrite to replace it, or choose " \
                               f"another path"
    assert cli_error(*base, "--overwrite").startswith(f"--snapshot: {mine} is not a CUDA memory snapshot;")
    assert cli_error("memory", "tiny", "--budget", "24", "--snapshot", tmp_path / "s.pickle").startswith(
        "--snapshot: records the --measure steps; add --measure")
    assert mine.read_text() == "mine"
