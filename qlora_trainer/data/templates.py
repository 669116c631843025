"""Named chat templates and the checks that make them safe for a given tokenizer.

Every named template is Jinja for ``tokenizer.apply_chat_template`` with ``{% generation %}`` blocks
around the assistant text, so the assistant mask comes from transformers (``return_assistant_tokens_mask``)
and the tokenization is the tokenizer's own. The turn markers of a template (``<|im_start|>``,
``<|eot_id|>``, ...) must each be ONE token of the tokenizer: split into pieces (the Llama-2 tokenizer
cuts ``<|im_start|>`` into 6), the model would have to learn a 6-token marker from scratch and
generation would not stop on it. ``data.marker_tokens`` decides what happens when one is not:

- ``require`` (default): refuse with one line naming the marker and the two other choices;
- ``add``: add the markers as special tokens; the embeddings grow (``model.resize_embeddings``) and the
  new rows of the input embedding and output layer train (saved with the adapter as PEFT's
  ``trainable_token_indices``; see ``lora/tokens.py``);
- ``split``: keep the pieces (a warning).

Templates that start turns with ``{{ bos_token }}`` (llama-2, llama-3, mistral) warn when the
tokenizer has no BOS token: the rendered samples would silently start without one.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from qlora_trainer.errors import DataError

log = logging.getLogger(__name__)

_SYSTEM_SPLIT = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}")


def _assistant(text: str) -> str:
    """Render assistant ``text`` (a Jinja expression) inside a ``{% generation %}`` block, unless the
    message has OpenAI's ``weight: 0`` (shown, not trained)."""
    return (f"{{% set text = {text} %}}{{% if message['weight'] is defined and message['weight'] == 0 %}}"
            "{{ text }}{% else %}{% generation %}{{ text }}{% endgeneration %}{% endif %}")


CHAT_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}" + _assistant("message['content'] + '<|im_end|>'") +
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s><s>[INST] ...
    "llama-2": (
        _SYSTEM_SPLIT +
        "{% for message in turns %}{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}" + _assistant("' ' + message['content'] | trim + ' ' + eos_token") +
        "{% endif %}{% endfor %}"
    ),
    # <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}" + _assistant("message['content'] | trim + '<|eot_id|>'") +
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # <s>[INST] system\n\nuser [/INST]answer</s>[INST] ...
    "mistral": (
        _SYSTEM_SPLIT + "{{ bos_token }}"
        "{% for message in turns %}{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}{% set content = system + '\n\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{{ '[INST] ' + content + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}" + _assistant("message['content'] + eos_token") +
        "{% endif %}{% endfor %}"
    ),
}

# special markers each template needs as single tokens (llama-2 / mistral's [INST] is plain text by design)
TEMPLATE_MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-2": (),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
}
_MARKER = re.compile(r"<\|[^|<>\s'\"]+\|>")  # <|...|> markers inside a custom or the tokenizer's template


def chat_template_for(tokenizer: Any, name: str | None) -> str:
    """``data.chat_template`` (a name above or a Jinja string) when set, else the tokenizer's own."""
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    if name and "{%" in name:
        return name
    if name:
        raise DataError(f"data.chat_template: {name!r} is not a template name ({', '.join(CHAT_TEMPLATES)}) "
                        "or a Jinja template string")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    raise DataError("data.chat_template: the tokenizer has no chat template; set data.chat_template to one of "
                    f"{', '.join(CHAT_TEMPLATES)} (or a Jinja template string)")


def template_markers(template: str, name: str | None = None) -> list[str]:
    """The special markers of ``template``: the named template's list, else every ``<|...|>`` literal."""
    if name in TEMPLATE_MARKERS:
        return list(TEMPLATE_MARKERS[name])
    return list(dict.fromkeys(_MARKER.findall(template)))


def split_markers(tokenizer: Any, markers: list[str]) -> dict[str, int]:
    """Markers that are not one token of ``tokenizer`` -> how many pieces it cuts them into."""
    out = {}
    for m in markers:
        n = len(tokenizer(m, add_special_tokens=False)["input_ids"])
        if n != 1:
            out[m] = n
    return out


def resolve_chat_template(tokenizer: Any, name: str | None, policy: str) -> tuple[str, list[int]]:
    """The template to render with, after the marker check and the BOS check.

    ``policy`` is ``data.marker_tokens``. With ``add`` the missing markers are added to ``tokenizer``
    in place as special tokens; returns ``(template, ids of the tokens added now)``.
    """
    template = chat_template_for(tokenizer, name)
    label = repr(name) if name in CHAT_TEMPLATES else "the chat template"
    split = split_markers(tokenizer, template_markers(template, name))
    added: list[int] = []
    if split:
        marker, pieces = next(iter(split.items()))
        if policy == "require":
            raise DataError(f"data.chat_template: marker {marker!r} of {label} is not one token of this tokenizer "
                            f"(it splits into {pieces} pieces); set data.marker_tokens=add to add "
                            f"{'it' if len(split) == 1 else f'all {len(split)}'} as special tokens (trains their "
                            "embeddings; needs model.resize_embeddings=true) or data.marker_tokens=split to keep "
                            "the pieces")
        if policy == "add":
            before = len(tokenizer)
            tokenizer.add_tokens(list(split), special_tokens=True)
            added = [tokenizer.convert_tokens_to_ids(m) for m in split]
            log.info("data: added %d special tokens %s (ids %s; vocabulary %d -> %d)", len(added), list(split),
                     added, before, len(tokenizer))
        else:
            log.warning("data.chat_template: markers %s of %s are split into pieces by this tokenizer "
                        "(data.marker_tokens=split)", list(split), label)
    check_bos(tokenizer, template, label)
    return template, added


def check_bos(tokenizer: Any, template: str, label: str = "the chat template") -> bool:
    """Warn (and return False) when ``template`` renders ``bos_token`` but the tokenizer has none, or when
    the tokenizer adds a BOS to plain text (the model expects one) but the template renders none
    (``apply_chat_template`` adds no special tokens itself)."""
    bos = getattr(tokenizer, "bos_token", None)
    if "bos_token" in template and bos is None:
        log.warning("data.chat_template: %s starts turns with a BOS token but the tokenizer has none; samples "
                    "will start without one (set the tokenizer's bos_token or pick a template without BOS)", label)
        return False
    if bos is not None and "bos_token" not in template and bos not in template:
        ids = tokenizer("a")["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            log.warning("data.chat_template: the tokenizer adds BOS %r to plain text but %s renders none; chat "
                        "samples will start without it (pick a template that starts with {{ bos_token }})", bos, label)
            return False
    return True


def new_token_bound(fmt: str, name: str | None, policy: str) -> int:
    """Upper bound on the tokens the data step adds for this config (for the memory estimate before any
    tokenizer loads): every marker of the named template when ``policy`` is ``add``."""
    if policy != "add" or fmt not in ("chat", "sharegpt") or not name:
        return 0
    return len(template_markers(chat_template_for(None, name), name))


def add_marker_tokens(tokenizer: Any, cfg: Any) -> list[int]:
    """``data.marker_tokens: add``: add the chat template's missing markers to ``tokenizer`` now, before
    the model is built (so its vocabulary includes them). Returns the new ids (their rows train)."""
    if cfg.marker_tokens != "add" or cfg.format not in ("chat", "sharegpt"):
        return []
    return resolve_chat_template(tokenizer, cfg.chat_template, "add")[1]
