"""`python -m nanoquant generate|chat|info MODEL.gguf` (the same as the `nanoquant` command)."""
import sys

from nanoquant.runtime.cli import main

sys.exit(main())
