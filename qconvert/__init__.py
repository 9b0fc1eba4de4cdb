"""qconvert: turn model checkpoints into a portable, versioned, block-quantized container.

    import qconvert
    qconvert.quantize("path/to/hf-folder", "model.q8", method="rtn", bits=8)
    with qconvert.load("model.q8") as c:
        print(c.metadata["recipe"], c.tensor("lm_head.weight").shape)
"""

__version__ = "0.1.0"

from .errors import QConvertError  # noqa: E402
from .container import Container, open_container as load  # noqa: E402
from .convert import quantize  # noqa: E402

__all__ = ["Container", "QConvertError", "__version__", "load", "quantize"]
