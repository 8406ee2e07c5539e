"""The file format: the NQ1 packed-sign layout and bit accounting (nq1), reading a GGUF's NanoQuant layers (info),
writing NanoQuant GGUF files (writer)."""
