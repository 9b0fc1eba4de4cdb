"""Round-to-nearest onto GGML's 32-element block types.

RTN needs no data: the block codec *is* the method (each block's scale comes from its own
min/max). This module only maps the user's ``--bits/--group/--sym`` onto a block type.
"""

from __future__ import annotations

from ..blocks import BlockType, by_name
from ..errors import QConvertError

# (bits, symmetric) -> GGML block type with group 32
_RTN_TYPES = {
    (4, True): "Q4_0",
    (4, False): "Q4_1",
    (5, True): "Q5_0",
    (5, False): "Q5_1",
    (8, True): "Q8_0",
}


def rtn_block_type(bits: int, group: int = 32, sym: bool = True) -> BlockType:
    if group != 32:
        raise QConvertError(f"rtn stores GGML blocks of 32 weights; --group {group} is not supported (use --group 32)")
    try:
        return by_name(_RTN_TYPES[(bits, sym)])
    except KeyError:
        if bits == 8:
            raise QConvertError("8-bit rtn is symmetric only (Q8_0); drop --asym") from None
        raise QConvertError(f"rtn supports --bits 4, 5 or 8, not {bits}") from None
