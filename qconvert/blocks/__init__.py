"""Block types: the registry and every codec in it.

Importing this package registers every block type; ``by_name("Q4_0")`` / ``by_id(2)`` look
one up. Adding a type means adding one module that calls :func:`register`.
"""

from .registry import BlockType, all_types, by_id, by_name, register
from . import floats, legacy  # noqa: F401  (registers the types)

__all__ = ["BlockType", "all_types", "by_id", "by_name", "register"]
