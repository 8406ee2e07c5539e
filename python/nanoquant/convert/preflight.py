"""The converter's checks before any work: every one reads only small files and the settings, so a wrong argument or
an incomplete model folder fails in well under a second with one line naming what is wrong, not after minutes of
calibration, and leaves nothing behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import torch

from nanoquant.fileformat.writer import FLOAT_TYPES, IMATRIX_TYPES, LOW_BIT_HEAD, row_quantizer
from nanoquant.convert.ranks import MAX_BPW

MIN_WINDOW_TOKENS = 16  # a window shorter than this holds hardly a sentence: the statistics would be noise
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # a fast tokenizer, or a SentencePiece model


class InputError(ValueError):
    pass


def check_settings(settings) -> None:
    """Ranges of the numeric settings, each error naming its command-line option."""
    if not 0.0 < settings.bpw <= MAX_BPW:
        raise InputError(f"--bpw: expected a bit rate in (0, {MAX_BPW:g}], got {settings.bpw:g}")
    if settings.calib_windows < 1:
        raise InputError(f"--calib-windows: expected at least 1 window, got {settings.calib_windows}")
    if settings.calib_window_tokens < MIN_WINDOW_TOKENS:
        raise InputError(f"--calib-window-tokens: expected at least {MIN_WINDOW_TOKENS} tokens, got "
                         f"{settings.calib_window_tokens}")
    if not 0.0 <= settings.chat_share <= 1.0:
        raise InputError(f"--chat-share: expected a share between 0 and 1, got {settings.chat_share:g}")
    counts = {"--admm-iterations": settings.admm.iterations, "--dense-steps": settings.tune.dense_steps,
              "--factor-steps": settings.tune.factor_steps, "--distill-steps": settings.distill.steps,
              "--threads": settings.threads}
    for flag, value in counts.items():
        if value < 0:
            raise InputError(f"{flag}: expected a count of 0 or more, got {value}")
    if settings.tune.batch_windows < 1:
        raise InputError(f"--tune-batch: expected at least 1 window, got {settings.tune.batch_windows}")
    rates = {"--dense-lr": settings.tune.dense_lr, "--latent-lr": settings.tune.latent_lr,
             "--scale-lr": settings.tune.scale_lr, "--distill-lr": settings.distill.lr}
    for flag, value in rates.items():
        if not value > 0:  # also refuses NaN
            raise InputError(f"{flag}: expected a positive learning rate, got {value:g}")
    if settings.shrinkage is not None and not 0.0 <= settings.shrinkage <= 1.0:
        raise InputError(f"--shrinkage: expected a share between 0 and 1, got {settings.shrinkage:g}")
    for flag, name in (("--other-type", settings.other_type), ("--token-embedding-type", settings.token_embd_type),
                       ("--output-tensor-type", settings.output_type)):
        wanted = LOW_BIT_HEAD if name is None else gguf.GGMLQuantizationType[name.upper()]  # None: the head's default
        if wanted in IMATRIX_TYPES and flag != "--output-tensor-type":
            raise InputError(f"{flag} {wanted.name}: this type needs an importance matrix, which the converter has "
                             "for the output head only (--output-tensor-type); choose a K-quant or Q8_0")
        if wanted not in FLOAT_TYPES:
            try:  # a type no quantizer here can write fails now, not after the conversion
                row_quantizer(wanted)
            except ValueError as e:
                raise InputError(f"{flag} {e}") from None
    if settings.device == "cuda" and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise InputError(f"--device cuda: torch {torch.__version__} ({built}) sees no CUDA device; use --device cpu "
                         "or auto")


def check_output(out_path: Path) -> None:
    """The output's folder exists (or can be made) and takes files; the output is not a folder."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError(f"--outfile: {out_path} is a folder, expected a file name")
    folder = out_path.parent if str(out_path.parent) else Path(".")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--outfile: {existing} is not a writable folder")


def check_model_folder(folder: Path) -> None:
    """A Hugging Face folder holds its config, a tokenizer and every safetensors shard its index names."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{folder}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: expected a JSON object with a weight_map ({type(e).__name__}: {e})") from None
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise InputError(f"{folder}: {len(missing)} of the {len(shards)} safetensors shards that {index.name} "
                             f"names are missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    elif not any(folder.glob("*.safetensors")):
        raise InputError(f"{folder}: no *.safetensors weights (and no model.safetensors.index.json)")
