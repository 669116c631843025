"""One small adapter per benchmarked system, each run as ``python -m benchmarks.systems.<name> SPEC ROW``
in its own process (Unsloth patches transformers on import, so systems never share a process)."""

SYSTEMS = ("hf", "hf-tuned", "unsloth", "qlora_trainer")
# the peers every row is compared with (speedup_vs_<peer>, memory_vs_<peer>)
PEERS = ("hf", "hf-tuned", "unsloth")
MODULES = {"hf": "benchmarks.systems.hf", "hf-tuned": "benchmarks.systems.hf_tuned",
           "unsloth": "benchmarks.systems.unsloth", "qlora_trainer": "benchmarks.systems.ours"}
UNSLOTH_MISSING = "unsloth is not installed (see benchmarks/README.md: device-peers)"
