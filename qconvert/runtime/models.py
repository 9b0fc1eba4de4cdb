"""Load a container's model: ``model.architecture`` picks the family in ``arch/``."""

from __future__ import annotations

from ..container import Container
from ..errors import QConvertError
from .weights import Weights


def load_model(container: Container):
    from .. import arch as archs

    a = container.architecture
    if a == "onnx":
        raise QConvertError(
            f"{container.path} holds an ONNX graph, not a language model: run it with"
            " `qconvert run FILE --input x.npy`, or export it with `qconvert export FILE --to onnx`"
        )
    arch = archs.by_name(a)
    if arch.kind == "decoder":
        from .decoder import Decoder

        return Decoder(arch, Weights(container), container.config)
    return arch.runtime(Weights(container), container.config)
