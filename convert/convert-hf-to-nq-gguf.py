#!/usr/bin/env python3
"""Convert a Hugging Face model (folder or GGUF) into a NanoQuant sub-1-bit GGUF. See --help."""
import sys

from nanoquant.convert import main

if __name__ == "__main__":
    sys.exit(main())
