"""Ollama TEMPLATEs: rendered (by a small interpreter of Go's text/template, ``gotemplate.py``) over
Ollama's ``.Messages``, each gives exactly the prompt our Jinja chat template gives for the same
conversation, BOS aside (llama.cpp adds it); and the Modelfile's lines."""

from __future__ import annotations

import jinja2
import pytest

from qlora_trainer.data.templates import CHAT_TEMPLATES
from qlora_trainer.errors import QloraError
from qlora_trainer.export.ollama import GO_TEMPLATES, modelfile
from qlora_trainer.export.vocab import serving_template

from .gotemplate import render

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"},
     {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 + 2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_go_template_renders_our_prompt(name, messages):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(serving_template(CHAT_TEMPLATES[name])).render(
        messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    got = render(GO_TEMPLATES[name], {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    assert want == ("<s>" if want.startswith("<s>") else "") + got


def test_modelfile_lines():
    text = modelfile("model-f16.gguf", "llama-3", num_ctx=2048, system="Be brief.", temperature=0.2)
    lines = text.splitlines()
    assert lines[1] == "FROM ./model-f16.gguf"
    assert 'PARAMETER stop "<|eot_id|>"' in lines and "PARAMETER num_ctx 2048" in lines
    assert "PARAMETER temperature 0.2" in lines and lines[-1] == 'SYSTEM """Be brief."""'
    assert text.count('"""') == 4  # TEMPLATE and SYSTEM, each quoted once
    with pytest.raises(QloraError, match="not one of ours"):
        modelfile("m.gguf", None)
