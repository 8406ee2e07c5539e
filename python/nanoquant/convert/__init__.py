"""The converter: a Hugging Face model (folder or GGUF) into a NanoQuant GGUF. `pipeline` runs the stages, each a
module of its own: `source` (the model, its tokenizer and base file), `windows` (calibration windows), `calibration`
(layer statistics), `ranks` (rank allocation), `blocks` (ADMM in `admm`, tuning in `reconstruct`), `reconstruct`
(scale distillation), `output` (the file). `settings` holds the presets and options, `checkpoint` the work folder."""
