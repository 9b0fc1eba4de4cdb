"""Calibration data: deterministic samples of token windows from a text file.

``--calib FILE`` (plain text; without it a built-in excerpt of Shakespeare, public domain,
shipped with qconvert so calibration works offline), ``--calib-samples N``,
``--calib-seqlen L``, ``--seed S``: N windows of L tokens at offsets drawn with numpy's
PCG64 generator seeded with S from the tokenized text (as GPTQ samples from C4). The text's
sha256, N, L and the seed go into the container's recipe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QConvertError

BUILTIN_CALIBRATION = Path(__file__).with_name("data") / "calibration.txt"


@dataclass
class CalibrationSet:
    tokens: np.ndarray  # (N, L) int64
    info: dict


def read_calibration_text(path: str | Path | None) -> tuple[str, str]:
    """(text, name) of the calibration file, or of the built-in default."""
    from .evaluate import read_text

    if path is None:
        return read_text(BUILTIN_CALIBRATION), "builtin:shakespeare"
    return read_text(path), Path(path).name


def sample_windows(tokens: list[int], n_samples: int, seqlen: int, seed: int, bos_id: int | None) -> np.ndarray:
    if n_samples < 1 or seqlen < 2:
        raise QConvertError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    usable = len(tokens) - seqlen
    if usable < 0:
        raise QConvertError(f"the calibration text has {len(tokens)} tokens, fewer than one window of {seqlen}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, usable + 1, size=n_samples)
    arr = np.asarray(tokens, dtype=np.int64)
    windows = np.stack([arr[s : s + seqlen] for s in starts])
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def calibration_set(tokenizer, path: str | Path | None, n_samples: int, seqlen: int, seed: int) -> CalibrationSet:
    text, name = read_calibration_text(path)
    tokens = tokenizer.encode(text, add_bos=False)
    bos = tokenizer.bos_id if tokenizer.add_bos_default else None
    windows = sample_windows(tokens, n_samples, seqlen, seed, bos)
    info = {
        "source": name,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "samples": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens": int(windows.size),
    }
    return CalibrationSet(windows, info)
