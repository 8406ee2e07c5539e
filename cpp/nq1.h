// NQ1: NanoQuant's packed-sign tensor type, shared by ggml (through ggml_patches/), the bindings and the tests.
//
// Layout: a row of n signs (n a multiple of 32) is n/32 blocks of 4 bytes. Element k of a block is bit k of the
// little-endian 32-bit word, and bit 1 means -1 (bit 0 means +1, so zero padding reads as +1). A row is therefore
// byte-identical to the reference NanoQuant checkpoint's lsb-first `*_packed` int32 words.
#pragma once

// The one definition of the ids; ggml.h / llama.h / gguf-py carry the same numbers and are checked against these
// at compile time (cpp/nq1-ref.c) and at test time (tests/test_format.py). 43..63 are left to upstream ggml.
#define NQ1_GGML_TYPE_ID   64
#define NQ1_LLAMA_FTYPE_ID 64
#define NQ1_BLOCK_SIZE     32
#define NQ1_BLOCK_BYTES    4
