"""Running GGUF files: nanoquant.Model over the patched libllama (model), the `nanoquant` command (cli), the demo."""
