"""Protocol P1 data: WikiText-2 token windows (DESIGN.md section 5).

Each file's whole text is read as is and tokenized in one call with the model's own tokenizer and
its default special-token handling; windows are cut from that stream, inserting nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["P1", "Protocol", "find_wikitext2", "token_stream", "windows", "p1_windows"]

DATA_ENV = "BIVLM_DATA"


@dataclass(frozen=True)
class Protocol:
    """A perplexity protocol: which file, how many windows of which length."""

    name: str
    calib_file: str
    calib_windows: int
    eval_file: str
    eval_windows: int
    seqlen: int


P1 = Protocol(
    name="P1",
    calib_file="valid.txt",
    calib_windows=128,
    eval_file="test.txt",
    eval_windows=64,
    seqlen=512,
)


def find_wikitext2(data: str | os.PathLike[str] | None = None) -> Path:
    """Locate the WikiText-2 folder holding ``valid.txt`` and ``test.txt``.

    Order: the ``data`` argument, ``$BIVLM_DATA``, then ``shared/data/wikitext-2`` beside any
    parent of the working directory or of this package (the repository layout).
    """
    candidates: list[Path] = []
    if data is not None:
        candidates.append(Path(data))
    elif os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    else:
        for base in (Path.cwd(), Path(__file__).resolve()):
            for parent in (base, *base.parents):
                candidates.append(parent / "shared" / "data" / "wikitext-2")
    for cand in candidates:
        if (cand / "test.txt").is_file() and (cand / "valid.txt").is_file():
            return cand
    tried = ", ".join(str(c) for c in candidates[:3]) + (" ..." if len(candidates) > 3 else "")
    raise FileNotFoundError(
        f"WikiText-2 not found (looked for valid.txt and test.txt in: {tried}). Pass --data DIR "
        f"(or set ${DATA_ENV}) pointing at a folder with the tokenized WikiText-2 valid.txt and "
        "test.txt."
    )


def token_stream(path: str | os.PathLike[str], tokenizer) -> torch.Tensor:
    """Tokenize a whole file in one call. Returns a (n_tokens,) int64 tensor."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text).input_ids
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seqlen: int, count: int, source: str = "stream") -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``seqlen`` tokens. Returns (count, seqlen)."""
    if seqlen <= 1 or count <= 0:
        raise ValueError(f"need seqlen > 1 and count > 0, got seqlen={seqlen}, count={count}")
    need = seqlen * count
    if stream.numel() < need:
        raise ValueError(
            f"{source} has {stream.numel()} tokens, fewer than {count} windows x {seqlen} = "
            f"{need}; use a longer file or fewer windows"
        )
    return stream[:need].view(count, seqlen)


def p1_windows(
    tokenizer,
    split: str,
    data: str | os.PathLike[str] | None = None,
    protocol: Protocol = P1,
    offset: int = 0,
) -> torch.Tensor:
    """Calibration (``split="calib"``) or evaluation (``split="eval"``) windows of a protocol.

    ``offset`` (calibration only) skips that many windows first: ``offset=128`` gives the next
    128 windows after the protocol's own, a disjoint calibration set for measuring spread.
    """
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(
            f"calibration offset must be an int >= 0 (windows skipped), got {offset!r}"
        )
    if offset and split != "calib":
        raise ValueError(f"offset={offset} is for calibration windows; P1 evaluation has none")
    folder = find_wikitext2(data)
    fname, count = (
        (protocol.calib_file, protocol.calib_windows)
        if split == "calib"
        else (protocol.eval_file, protocol.eval_windows)
    )
    stream = token_stream(folder / fname, tokenizer)
    return windows(stream, protocol.seqlen, offset + count, source=str(folder / fname))[offset:]
