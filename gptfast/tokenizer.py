"""GPT-2's BPE tokenizer (tiktoken), and how its ids are stored on disk."""

from __future__ import annotations

import numpy as np

from gptfast.errors import DataError

TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits: half the bytes of int32
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>


def get_tokenizer():
    """tiktoken's GPT-2 BPE (honours TIKTOKEN_CACHE_DIR; downloads its files on first use)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/urllib errors of several kinds offline
        raise DataError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}: {e}); offline, point "
            "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached GPT-2 files") from None
