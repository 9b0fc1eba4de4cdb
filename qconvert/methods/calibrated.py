"""Group sizes and the encoding of group-wise matrices (GPTQ, AWQ, group-wise RTN) into the
integer block family I{bits}G{group}.

A matrix whose input width the requested group does not divide (SmolLM2's 576 with group
128) uses the largest of 64 and 32 that does -- the same for every method, so comparisons stay
fair -- and the plan records it. Act-order results are stored with their columns in
quantization order, the permutation in the tensor's ``input_perm`` parameter.
"""

from __future__ import annotations

import numpy as np

from ..errors import QConvertError

GROUPS = (128, 64, 32)
BITS = (2, 3, 4, 8)


def group_for(in_features: int, group: int) -> int | None:
    """The group used for rows of ``in_features``: ``group``, else 64 or 32; None if none fits
    (such a matrix stays in float, as the F16 fallback of the other methods)."""
    if group not in GROUPS:
        raise QConvertError(f"--group must be one of {', '.join(map(str, GROUPS))} for group-wise storage, not {group}")
    for g in (group, *[g for g in GROUPS if g < group]):
        if in_features % g == 0:
            return g
    return None


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise QConvertError(f"group-wise storage supports --bits {', '.join(map(str, BITS))}, not {bits}")


from ..blocks.groupwise import Encoded, encode_linear  # noqa: E402,F401  (re-exported)


def rtn_encode(values: np.ndarray, bits: int, group: int, sym: bool, mse: bool = False) -> Encoded:
    from ..blocks.grid import rtn_groupwise

    g = group_for(values.shape[1], group)
    assert g is not None, "the plan falls back to F16 for rows no group divides"
    q, scales, zeros = rtn_groupwise(values, bits, g, sym, mse)
    return encode_linear(q, scales, zeros, bits, None)


