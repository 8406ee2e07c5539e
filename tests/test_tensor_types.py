"""The types of the tensors that are not NanoQuant layers, by role (token embedding, output head, the rest), and a kept
work folder written again with other types without computing anything."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import TINY_METHOD_ARGS, run_converter
from nanoquant.fileformat.writer import ROW_FALLBACK, fitting_type

T = gguf.GGMLQuantizationType


def tensor_types(path) -> dict[str, T]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory, smol_tokenizer):
    """A tiny llama whose rows (256 wide) take K- and I-quants, with its own output head."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("untied") / "hf"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=len(smol_tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id))
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


def test_embedding_and_head_take_their_own_types_and_a_kept_folder_rewrites_them(untied_llama, tmp_path):
    out, work = tmp_path / "nq.gguf", tmp_path / "work"
    proc = run_converter(untied_llama, "--outfile", out, "--work-dir", work, "--keep-work", *TINY_METHOD_ARGS,
                         "--token-embedding-type", "Q2_K", "--output-tensor-type", "IQ2_XXS")
    assert proc.returncode == 0, proc.stderr[-3000:]
    types = tensor_types(out)
    assert types["token_embd.weight"] == T.Q2_K
    assert types["output.weight"] == T.IQ2_XXS  # an I-quant: quantised with the calibration's importance matrix
    assert types["blk.0.attn_norm.weight"] == T.F32
    assert types["blk.0.attn_q.nq_u"] != T.Q8_0
    first = out.stat().st_size

    again = tmp_path / "nq-q4k.gguf"
    proc = run_converter(untied_llama, "--outfile", again, "--work-dir", work, "--resume", *TINY_METHOD_ARGS,
                         "--token-embedding-type", "Q8_0", "--output-tensor-type", "Q4_K")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpointed" in proc.stdout and "statistics:" not in proc.stdout and "blocks:" not in proc.stdout
    types = tensor_types(again)
    assert types["token_embd.weight"] == T.Q8_0 and types["output.weight"] == T.Q4_K
    assert again.stat().st_size > first
    # the NanoQuant tensors are the same bytes: only the roles' types changed
    nq = lambda path: {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors if ".nq_" in t.name}  # noqa
    a, b = nq(out), nq(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_imatrix_type_is_refused_for_the_embedding_before_any_work(untied_llama, tmp_path):
    out = tmp_path / "nq.gguf"
    proc = run_converter(untied_llama, "--outfile", out, "--token-embedding-type", "IQ1_S")
    assert proc.returncode == 2
    assert "--token-embedding-type IQ1_S" in proc.stderr and "importance matrix" in proc.stderr
    assert not out.exists() and not out.with_name(out.name + ".work").exists()


@pytest.mark.parametrize("target,cols,expected", [
    (T.Q2_K, 256, T.Q2_K), (T.Q2_K, 576, T.Q4_0), (T.IQ2_XXS, 576, T.IQ4_NL), (T.Q5_K, 96, T.Q5_1),
    (T.Q6_K, 576, T.Q8_0), (T.Q8_0, 48, T.F32), (T.Q4_K, 40, T.F32),
])
def test_rows_a_type_does_not_divide_fall_back_as_llama_quantize_does(target, cols, expected):
    assert fitting_type(target, cols) == expected
    assert set(ROW_FALLBACK.values()) <= {T.IQ4_NL, T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0}


def test_the_output_head_as_a_nanoquant_layer_runs_in_llama_cpp_as_in_the_reference(untied_llama, tmp_path, eval_text):
    """--nq-head: the head's rank comes out of the same budget, llama.cpp multiplies it as it does the decoder's
    layers, and its perplexity is the Python reference forward's."""
    from conftest import llama_perplexity
    from nanoquant.fileformat.info import decoder_linear_bits, describe
    from nanoquant.reference import gguf_add_bos, load_reference_model, open_gguf, perplexity, perplexity_tokens

    out = tmp_path / "nq-head.gguf"
    proc = run_converter(untied_llama, "--outfile", out, *TINY_METHOD_ARGS, "--nq-head", "on")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "output head: rank" in proc.stdout
    types = tensor_types(out)
    assert "output.weight" not in types and types["output.nq_v"] == types["output.nq_u"]
    info = describe(out)
    head = next(l for l in info.layers if l.base == "output")
    bits, weights = decoder_linear_bits(out)  # bpw_linear counts the decoder's layers only
    assert head.d_out == 49152 and head.d_in == 256 and weights == 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 512)
    assert (bits + head.bits) / (weights + head.d_out * head.d_in) <= 1.0 * 1.02  # one budget for both
    ppl_cpp = llama_perplexity(out, eval_text, 128, 2)
    model, tokenizer, _ = load_reference_model(out)
    add_bos = gguf_add_bos(open_gguf(out))
    tokens = perplexity_tokens(tokenizer, eval_text.read_text(encoding="utf-8"), add_bos)
    ppl_py = perplexity(model, tokens, 128, 2, tokenizer.bos_token_id if add_bos else None)
    assert abs(ppl_cpp - ppl_py) / ppl_py < 0.01, (ppl_cpp, ppl_py)


def test_a_tied_head_is_refused_as_a_nanoquant_layer(tmp_path, smol_tokenizer):
    from conftest import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", smol_tokenizer)  # ties its head to the embedding
    out = tmp_path / "nq.gguf"
    proc = run_converter(hf, "--outfile", out, *TINY_METHOD_ARGS, "--nq-head", "on")
    assert proc.returncode == 2 and "--nq-head on" in proc.stderr and "ties its output head" in proc.stderr
    assert not out.exists()


def test_the_default_types_of_the_embedding_and_the_head():
    """The embedding Q2_K and the head Q4_K, the head Q8_0 where 256 does not divide its rows (a tied embedding is the
    head, as for SmolLM2's 576-wide rows)."""
    from nanoquant.convert.output import tensor_types
    from nanoquant.convert.settings import ConvertSettings

    types = tensor_types(ConvertSettings())
    assert types.for_tensor("output.weight", False, 1536) == T.Q4_K
    assert types.for_tensor("output.weight", False, 576) == T.Q8_0
    assert types.for_tensor("token_embd.weight", False, 1536) == T.Q2_K
    assert types.for_tensor("token_embd.weight", True, 576) == T.Q8_0 == types.for_tensor("token_embd.weight", True, 96)
    assert types.for_tensor("token_embd.weight", True, 2048) == T.Q4_K
    assert types.for_tensor("blk.0.ffn_down.weight", False, 1536) == T.Q8_0
    chosen = tensor_types(ConvertSettings(token_embd_type="q8_0", output_type="IQ2_XXS"))
    assert chosen.for_tensor("output.weight", False, 1536) == T.IQ2_XXS
    assert chosen.for_tensor("token_embd.weight", False, 1536) == T.Q8_0


def test_a_work_folder_adds_up_the_time_of_the_runs_that_computed_in_it(tmp_path):
    from nanoquant.convert.checkpoint import WorkFolder

    first = WorkFolder(tmp_path / "w", {"a": 1}, resume=False)
    first._opened -= 100  # as if this run had computed for 100 s
    first.save_ranks({"x": 32})
    assert first.computed and 100 <= first.spent()["seconds"] < 110 and first.spent()["peak_rss_mib"] > 0
    again = WorkFolder(tmp_path / "w", {"a": 1}, resume=True)  # a second run: only written again, or resumed
    assert not again.computed and again.spent() == first.spent()
    again._opened -= 50
    again.save_ranks({"x": 32})
    assert 150 <= again.spent()["seconds"] < 170
