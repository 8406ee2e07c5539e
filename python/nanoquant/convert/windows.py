"""Stage 1, calibration windows: raw text and, for a chat model, conversations the teacher answers in its own chat
template, every window starting as the model is used (BOS where the GGUF asks for one)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from nanoquant.convert.calibration import (DEFAULT_CHAT_INSTRUCTIONS, chat_windows, read_conversations,
                                           read_instructions, teacher_conversations, text_windows, window_bos)
from nanoquant.convert.checkpoint import WorkFolder
from nanoquant.convert.settings import CHAT_AUTO, CHAT_NONE, ConvertSettings
from nanoquant.convert.source import ConversionError, Source, answering_teacher


def chat_conversations(source: Source, settings: ConvertSettings, work: WorkFolder, tokens_needed: int):
    """The calibration conversations: none, a user's own (--calib-chat FILE), or ("auto", for a model with a chat
    template) the teacher's answers to the project's instruction list, made once and kept in the work folder."""
    if settings.calib_chat == CHAT_NONE or tokens_needed == 0:
        return []
    if not getattr(source.tokenizer, "chat_template", None):
        if settings.calib_chat == CHAT_AUTO:
            print("calibration: the model has no chat template; raw text only")
            return []
        raise ConversionError(f"--calib-chat {settings.calib_chat}: {source.path} has no chat template to render "
                              "conversations with")
    if settings.calib_chat != CHAT_AUTO:
        return read_conversations(Path(settings.calib_chat))
    conversations = work.load_conversations()
    if conversations is None:
        clock = time.time()
        conversations = teacher_conversations(answering_teacher(source), read_instructions(DEFAULT_CHAT_INSTRUCTIONS),
                                              tokens_needed, source.tokenizer, settings.seed, settings.threads)
        work.save_conversations(conversations)
        print(f"calibration: the teacher answered {len(conversations)} instructions in {time.time() - clock:.0f} s")
    return conversations


def chat_window_count(settings: ConvertSettings) -> int:
    """How many calibration windows are conversations, where the model has any (bench/gpu_carry.py reads it too, to
    make the conversations a run of these settings would)."""
    return 0 if settings.calib_chat == CHAT_NONE else round(settings.calib_windows * settings.chat_share)


def calibration_windows(source: Source, settings: ConvertSettings, work: WorkFolder) -> torch.Tensor:
    """All calibration windows, raw text first, then conversations; every window starts as the model is used."""
    bos = window_bos(source.base_gguf, source.tokenizer)
    n, length = settings.calib_windows, settings.calib_window_tokens
    n_chat = chat_window_count(settings)
    conversations = chat_conversations(source, settings, work, n_chat * length)
    n_chat = n_chat if conversations else 0
    windows = torch.cat([text_windows(source.tokenizer, settings.calib_text, n - n_chat, length, settings.seed, bos),
                         chat_windows(source.tokenizer, conversations, n_chat, length, settings.seed, bos)])
    print(f"calibration: {n - n_chat} windows of {settings.calib_text.name} and {n_chat} of conversations, "
          f"{length} tokens each, {'starting with BOS' if bos is not None else 'without BOS'} (token {bos})")
    return windows
