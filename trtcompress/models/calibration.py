"""Calibration batches: BoolQ passage tokens right after the perplexity window (never overlapping it)."""

from __future__ import annotations

import torch

from trtcompress.errors import CalibrationError
from trtcompress.eval.datasets import TokenStream


def calibration_tokens(tokenizer, num_samples: int, seq_len: int, skip_tokens: int) -> torch.Tensor:
    """(num_samples, seq_len) token ids taken contiguously after the first `skip_tokens` tokens."""
    stream = TokenStream(tokenizer)
    try:
        ids = stream.after(skip_tokens, num_samples * seq_len)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    return torch.tensor(ids, dtype=torch.long).view(num_samples, seq_len)
