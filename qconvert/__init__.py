"""qconvert: turn model checkpoints into a portable, versioned, block-quantized container.

    import qconvert
    qconvert.quantize("path/to/hf-folder", "model.q8", method="rtn", bits=8)
    with qconvert.load("model.q8") as c:
        print(c.metadata["recipe"], c.tensor("lm_head.weight").shape)
    print(qconvert.generate("model.q8", "Once upon a time").text)

One function per CLI command: quantize, inspect, generate (``run``), evaluate (``eval``),
export, imatrix (qconvert/api.py).
"""

__version__ = "0.1.0"

from .errors import QConvertError  # noqa: E402
from .container import Container, open_container as load  # noqa: E402
from .convert import quantize  # noqa: E402

# The API functions evaluate / export / imatrix share their names with submodules. Import the
# submodules first: a submodule's first import sets the package attribute of its name, so after
# this the names stay the functions, and `from qconvert.imatrix import ...` still finds the module.
from . import evaluate, export, imatrix  # noqa: E402,F401
from .api import embed, evaluate, export, generate, imatrix, inspect, run  # noqa: E402,F811

__all__ = ["Container", "QConvertError", "__version__", "embed", "evaluate", "export", "generate", "imatrix",
           "inspect", "load", "quantize", "run"]
