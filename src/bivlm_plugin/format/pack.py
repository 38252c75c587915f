"""Bit packing along the last dimension: bool planes to int32 (or uint8) words and back.

Bit order (the one rule every kernel and integration relies on): for a plane of n elements,
word ``w`` holds elements ``32 w .. 32 w + 31`` and **bit j of word w (value 1 << j) is element
32 w + j** (LSB first; little-endian, so the low 16 bits of a word are elements 32 w .. 32 w + 15,
which is what the AVX512 kernel loads as one ``__mmask16``). Bit 31 is stored in the int32 sign
bit. The last word is padded with **zero bits** (elements n .. 32 ceil(n / 32) - 1). The same rule
holds for uint8 words with 8 in place of 32.

Non-goals: choosing which tensors to pack (``layout.py``), codes conversion (``codes.py``).
"""

from __future__ import annotations

import torch

__all__ = ["WORD_BITS", "n_words", "pack_bits", "unpack_bits"]

WORD_BITS = {torch.int32: 32, torch.uint8: 8}


def n_words(n: int, dtype: torch.dtype = torch.int32) -> int:
    """Words needed for ``n`` bits: ceil(n / bits_per_word)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bits = _word_bits(dtype)
    return (n + bits - 1) // bits


def _word_bits(dtype: torch.dtype) -> int:
    if dtype not in WORD_BITS:
        raise ValueError(f"word dtype must be torch.int32 or torch.uint8, got {dtype}")
    return WORD_BITS[dtype]


def pack_bits(bits: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack a boolean tensor along its last dim, LSB first, zero-padded.

    Args:
        bits: (..., n) bool (any dtype: nonzero = 1).
        dtype: word dtype, ``torch.int32`` (32 bits per word) or ``torch.uint8`` (8).

    Returns:
        (..., ceil(n / word_bits)) words of ``dtype``; bit j of word w is element word_bits*w + j.
    """
    wb = _word_bits(dtype)
    n = bits.shape[-1]
    nw = n_words(n, dtype)
    b = bits.to(torch.bool).to(torch.int64)
    pad = nw * wb - n
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], nw, wb)
    weights = torch.ones((), dtype=torch.int64, device=b.device) << torch.arange(
        wb, dtype=torch.int64, device=b.device
    )
    words = (b * weights).sum(dim=-1)
    if dtype == torch.int32:
        # Two's-complement wrap so bit 31 lands in the int32 sign bit.
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(dtype)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``.

    Args:
        words: (..., w) int32 or uint8 words.
        n: number of elements to return (<= w * word_bits); padding bits are dropped.

    Returns:
        (..., n) bool.
    """
    wb = _word_bits(words.dtype)
    nw = words.shape[-1]
    if n > nw * wb:
        raise ValueError(f"cannot unpack n={n} elements from {nw} words of {wb} bits")
    w64 = words.to(torch.int64) & ((1 << wb) - 1)
    shifts = torch.arange(wb, dtype=torch.int64, device=words.device)
    b = (w64.unsqueeze(-1) >> shifts) & 1
    return b.reshape(*words.shape[:-1], nw * wb)[..., :n].to(torch.bool)
