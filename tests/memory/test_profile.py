"""Profiler bookkeeping and the measured-vs-estimated table, on the CPU with a scripted reader."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.memory.estimate import GIB, MemoryEstimate
from qlora_trainer.memory.profile import CudaReader, Profiler


class ScriptedReader:
    """Returns the next (allocated, reserved) pair at each ``peak()``; counts resets."""

    def __init__(self, peaks):
        self.peaks, self.resets = list(peaks), 0

    def reset_peak(self):
        self.resets += 1

    def peak(self):
        return self.peaks.pop(0)


def _est() -> MemoryEstimate:
    comp = {"base_nf4": 4 * GIB, "quant_constants": GIB // 4, "embeddings": GIB // 4, "lm_head": GIB // 4,
            "norms_biases": 0, "lora_params": GIB // 4, "lora_grads": GIB // 4, "optimizer_states": GIB // 4,
            "checkpoints": GIB // 2, "layer_recompute": GIB // 2}
    return MemoryEstimate("x", {}, comp)


def test_phase_peaks_and_comparison():
    reader = ScriptedReader([(5 * GIB, 6 * GIB), (6 * GIB, 6 * GIB), (7 * GIB, 8 * GIB), (8 * GIB, 9 * GIB)])
    prof = Profiler(reader)
    with prof.phase("load"):
        pass
    with prof.phase("adapters"):
        pass
    with prof.phase("backward"):
        pass
    with prof.phase("backward"):   # a repeated phase keeps the max
        pass
    assert reader.resets == 4
    assert prof.peaks["backward"].allocated == 8 * GIB and prof.peaks["backward"].reserved == 9 * GIB
    rows = {r["phase"]: r for r in prof.compare(_est())}
    # load: static parts 4.75 GiB vs 5 measured -> -5%; adapters: 5.0 vs 6 -> -16.7%; backward: all 6.5 vs 8
    assert rows["load"]["estimated_gib"] == pytest.approx(4.75)
    assert rows["load"]["error_pct"] == pytest.approx(-5.0)
    assert rows["adapters"]["error_pct"] == pytest.approx(100 * (5.0 - 6) / 6)
    assert rows["backward"]["estimated_gib"] == pytest.approx(6.5)
    assert rows["backward"]["measured_reserved_gib"] == pytest.approx(9.0)
    md = prof.to_markdown(_est())
    assert "| load | 5.00 | 6.00 | 4.75 | -5.0% |" in md
    assert "| backward | 8.00 | 9.00 | 6.50 | -18.8% |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_cuda_reader_says_no_cuda_cleanly():
    with pytest.raises(QloraError, match="no CUDA device"):
        Profiler()
    with pytest.raises(QloraError, match="no CUDA device"):
        CudaReader()


@pytest.mark.gpu
def test_measure_tiny_on_gpu_close_to_estimate(tmp_path):
    """Real steps with the synthetic tiny model; the step peak is reported for every phase and the
    snapshot is written."""
    from qlora_trainer.train.measure import measure_training

    snap = tmp_path / "snap.pickle"
    prof = measure_training("tiny", seq_len=128, batch=2, steps=2, snapshot=str(snap))
    assert set(prof.peaks) == {"load", "adapters", "forward", "backward", "step", "eval"}
    assert snap.stat().st_size > 0
    assert prof.peaks["backward"].allocated >= prof.peaks["load"].allocated > 0


def test_snapshot_is_written_aside_and_recognised(tmp_path, monkeypatch):
    """``memory_history`` dumps the snapshot to a temporary beside PATH and renames it: a dump that
    fails half-way leaves the earlier snapshot; ``is_snapshot`` recognises what torch dumps."""
    import pickle

    from qlora_trainer.memory.profile import is_snapshot, memory_history

    def dump(path):  # torch.cuda.memory._dump_snapshot: a pickled dict of these keys
        with open(path, "wb") as f:
            pickle.dump({"segments": [], "device_traces": [[]]}, f)

    def dies(path):
        with open(path, "wb") as f:
            f.write(b"\x80\x04half")
        raise RuntimeError("dump died")

    snap = tmp_path / "snap.pickle"
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    with memory_history(str(snap)):
        pass
    first = snap.read_bytes()
    assert is_snapshot(snap) and pickle.loads(first)["device_traces"] == [[]]
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dies)
    with pytest.raises(RuntimeError, match="dump died"), memory_history(str(snap)):
        pass
    assert snap.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["snap.pickle"]
    (tmp_path / "notes.txt").write_text("device_traces")
    assert not is_snapshot(tmp_path / "notes.txt")
