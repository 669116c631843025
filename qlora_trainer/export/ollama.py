"""An Ollama Modelfile beside a GGUF: ``ollama create NAME -f Modelfile`` needs nothing else.

The TEMPLATE is our named chat template rewritten in Go's ``text/template`` over Ollama's
``.Messages`` (each with ``.Role`` and ``.Content``; Ollama puts SYSTEM in as the first message),
ending with the assistant header so the model answers next. The BOS token is not in the template:
llama.cpp adds it (``tokenizer.ggml.add_bos_token``) as transformers does.
"""

from __future__ import annotations

from qlora_trainer.errors import QloraError
from qlora_trainer.export.chat import TURN_ENDS

_SYSTEM = '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}' \
          '{{- end }}{{- $first := true }}'

GO_TEMPLATES: dict[str, str] = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "llama-3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama-2": (_SYSTEM + '{{- range .Messages }}{{- if eq .Role "user" }}{{- if not $first }}<s>{{- end }}[INST] '
                "{{ if and $first $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
                '{{- $first = false }}{{- else if eq .Role "assistant" }} {{ .Content }} </s>{{- end }}{{- end }}'),
    "mistral": (_SYSTEM + '{{- range .Messages }}{{- if eq .Role "user" }}[INST] '
                "{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }} [/INST]{{- $first = false }}"
                '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}'),
}


def modelfile(gguf_name: str, template: str | None, *, num_ctx: int = 4096, system: str | None = None,
              temperature: float | None = None) -> str:
    """The Modelfile text for the GGUF file ``gguf_name`` (relative to the Modelfile) speaking the named
    chat ``template``."""
    if template not in GO_TEMPLATES:
        known = ", ".join(GO_TEMPLATES)
        raise QloraError(f"export --to ollama: the model's chat template is not one of ours ({known}), so no "
                         f"Ollama TEMPLATE can be written for it; pass --chat-template with one of them")
    lines = ["# ollama create NAME -f Modelfile", f"FROM ./{gguf_name}", f'TEMPLATE """{GO_TEMPLATES[template]}"""']
    lines += [f'PARAMETER stop "{s}"' for s in TURN_ENDS[template][1]]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature}")
    if system:
        if '"""' in system:
            raise QloraError('export --to ollama: --system cannot contain """')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
