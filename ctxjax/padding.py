"""Left padding and shape buckets for token-id batches: numpy only, shared by data, sampling,
evaluation and base-model building (so none of them imports another just to pad).

Left padding keeps every prompt's last token in the last column, where generation continues; shape
buckets (powers of two) keep jitted functions from compiling once per batch shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MIN_BUCKET = 8


def pad_left(
    seqs: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token sequences to `length`: (ids [N, length] int32, mask [N, length] bool)."""
    ids_NxL = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask_NxL = np.zeros((len(seqs), length), dtype=bool)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if n > length:
            raise ValueError(f"pad_left: sequence {row} has {n} tokens > length {length}")
        if n:
            ids_NxL[row, length - n :] = seq
            mask_NxL[row, length - n :] = True
    return ids_NxL, mask_NxL


def pad_left_rows(
    seqs: Sequence[Sequence[int]], length: int, rows: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """`pad_left` plus filler rows up to `rows` (a bucketed batch size): (ids, mask) [rows, length].

    A filler row gets one real token (id 0, always in the vocabulary) in the last column, so that no
    row attends to nothing; the caller marks those rows finished.
    """
    ids_BxL, mask_BxL = pad_left(list(seqs) + [[]] * (rows - len(seqs)), length, pad_id)
    ids_BxL[len(seqs) :, -1] = 0
    mask_BxL[len(seqs) :, -1] = True
    return ids_BxL, mask_BxL


def bucket_length(n: int, minimum: int = _MIN_BUCKET) -> int:
    """The next power of two >= n, at least `minimum`: variable lengths compile a few times."""
    if n < 0 or minimum < 1:
        raise ValueError(f"bucket_length needs n >= 0 and minimum >= 1, got {n=}, {minimum=}")
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def bucket_batch(n: int) -> int:
    """Batch sizes: powers of two up to 8, then multiples of 8 (at most 7 wasted rows past 8)."""
    if n <= _MIN_BUCKET:
        return bucket_length(n, minimum=1)
    return -(-n // _MIN_BUCKET) * _MIN_BUCKET
