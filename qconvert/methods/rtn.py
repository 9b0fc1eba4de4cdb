"""Round-to-nearest onto GGML's 32-element block types.

RTN needs no data: the block codec *is* the method (each block's scale comes from its own
min/max). This module only maps the user's ``--bits/--group/--sym`` onto a block type.
"""

from __future__ import annotations

from ..errors import QConvertError
from .mixes import MIXES, Mix

# (bits, symmetric) -> llama.cpp mix of that GGML block type (group 32)
_RTN_MIXES = {
    (4, True): "q4_0",
    (4, False): "q4_1",
    (5, True): "q5_0",
    (5, False): "q5_1",
    (8, True): "q8_0",
}


def rtn_mix(bits: int, group: int = 32, sym: bool = True) -> Mix:
    if group != 32:
        raise QConvertError(f"rtn stores GGML blocks of 32 weights; --group {group} is not supported (use --group 32)")
    try:
        return MIXES[_RTN_MIXES[(bits, sym)]]
    except KeyError:
        if bits == 8:
            raise QConvertError("8-bit rtn is symmetric only (Q8_0); drop --asym") from None
        raise QConvertError(f"rtn supports --bits 4, 5 or 8, not {bits}") from None
