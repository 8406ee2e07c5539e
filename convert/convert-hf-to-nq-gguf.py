#!/usr/bin/env python3
"""Convert a Hugging Face model (folder or GGUF) into a NanoQuant sub-1-bit GGUF. See --help.

This is the checkout's command line: llama.cpp's Hugging Face converter comes from the checkout's patched tree
(vendor/llama.cpp, made by `make setup`) unless NANOQUANT_LLAMA_CPP names another. An installed wheel has
`convert-hf-to-nq-gguf`, which uses the copy the wheel carries."""
import os
import sys
from pathlib import Path

from nanoquant.convert.pipeline import main
from nanoquant.convert.source import LLAMA_CPP_ENV

if __name__ == "__main__":
    os.environ.setdefault(LLAMA_CPP_ENV, str(Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp"))
    sys.exit(main())
