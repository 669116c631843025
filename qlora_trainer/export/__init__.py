"""Export a merged model or an adapter for the runtimes users serve with: llama.cpp GGUF (model and
LoRA adapter), Ollama (Modelfile beside a GGUF) and vLLM (16-bit HF directory + PEFT adapter)."""
