"""One small adapter per benchmarked system, each run as ``python -m benchmarks.systems.<name> SPEC ROW``
in its own process (Unsloth patches transformers on import, so systems never share a process)."""

SYSTEMS = ("hf", "unsloth", "qlora_trainer")
MODULES = {"hf": "benchmarks.systems.hf", "unsloth": "benchmarks.systems.unsloth",
           "qlora_trainer": "benchmarks.systems.ours"}
UNSLOTH_MISSING = "unsloth is not installed (see benchmarks/README.md: device-peers)"
