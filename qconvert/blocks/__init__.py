"""Block types: the registry and every codec in it.

Importing this package registers every block type; ``by_name("Q4_0")`` / ``by_id(2)`` look
one up. Adding a type means adding one module that calls :func:`register`.
"""

from .registry import BlockType, all_types, by_id, by_name, register
from . import floats, kquants, legacy  # noqa: F401  (registers the types)
from . import nf4  # noqa: F401,E402  (bitsandbytes NF4 / NF4_DQ)
from . import groupwise  # noqa: F401,E402  (I{bits}G{group}: GPTQ / AWQ group-wise integers)
from . import w8a8  # noqa: F401,E402  (W8A8: int8 rows + per-row scales, SmoothQuant)
from . import iquants  # noqa: F401,E402  (IQ4_NL, IQ4_XS: llama.cpp non-linear 4-bit)

__all__ = ["BlockType", "all_types", "by_id", "by_name", "register"]
