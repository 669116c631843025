"""Which of our named chat templates a model speaks, and what ends its turns (for runtimes that need
stop tokens: llama.cpp's end-of-turn id, Ollama's ``stop``, vLLM's ``generation_config.json``)."""

from __future__ import annotations

from typing import Any

from qlora_trainer.data.templates import CHAT_TEMPLATES
from qlora_trainer.export.vocab import serving_template

# template name -> (end-of-turn token or None, stop strings)
TURN_ENDS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "chatml": ("<|im_end|>", ("<|im_end|>", "<|im_start|>")),
    "llama-3": ("<|eot_id|>", ("<|eot_id|>", "<|start_header_id|>")),
    "llama-2": (None, ("</s>", "[INST]")),
    "mistral": (None, ("</s>", "[INST]")),
}


def template_name(template: str | None) -> str | None:
    """The name of ``template`` (a named template, its Jinja with or without ``{% generation %}``), or None."""
    if template in CHAT_TEMPLATES:
        return template
    if not template:
        return None
    plain = serving_template(template)
    return next((n for n, t in CHAT_TEMPLATES.items() if serving_template(t) == plain), None)


def resolve_template(tokenizer: Any, choice: str | None) -> tuple[str | None, str | None]:
    """``(Jinja template or None, its name or None)``: ``choice`` (a name or Jinja) when given, else the
    tokenizer's own template."""
    template = CHAT_TEMPLATES.get(choice, choice) if choice else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return (template or None), template_name(template)


def end_of_turn(name: str | None) -> str | None:
    return TURN_ENDS[name][0] if name in TURN_ENDS else None
