"""Input readers. :func:`open_source` picks one from what the path is."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import QConvertError
from .base import Source, SourceTensor

__all__ = ["DEMO_PREFIX", "Source", "SourceTensor", "demo_folder", "demo_names", "open_source"]

DEMO_PREFIX = "demo:"


def demo_names() -> list[str]:
    """The models packaged in ``qconvert/demo/`` (each a Hugging Face folder, with its licence)."""
    root = resources.files("qconvert") / "demo"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def demo_folder(name: str) -> Path:
    """The packaged folder of the built-in model ``demo:NAME``: no network, no hub cache."""
    names = demo_names()
    if name not in names:
        raise QConvertError(f"no built-in demo model {name!r}; available: {', '.join(DEMO_PREFIX + n for n in names)}")
    # qconvert is installed as files (it needs numba), so the resource is a real folder.
    return Path(str(resources.files("qconvert") / "demo" / name))


def open_source(spec: str, revision: str | None = None) -> Source:
    """``demo:NAME`` (a model packaged with qconvert), a ``.gguf`` or ``.onnx`` file, a local
    Hugging Face folder, or a hub id (``owner/name``)."""
    if spec.startswith(DEMO_PREFIX):
        if revision is not None:
            raise QConvertError("--revision is for hub ids; a demo: model is the one packaged with qconvert")
        from .hf import open_hf

        src = open_hf(str(demo_folder(spec[len(DEMO_PREFIX):])))
        src.provenance["id"] = spec  # the files' sha256 are recorded as for any folder
        return src
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise QConvertError(f"no such file: {spec}")
        from .gguf import open_gguf

        return open_gguf(path)
    if path.is_file() and _is_container(path):
        from .container import open_container_source

        return open_container_source(path)
    if path.suffix.lower() == ".onnx":
        from .onnx import open_onnx

        return open_onnx(path)
    if path.is_file() and path.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise QConvertError(
            f"{path.name} is a pickle checkpoint; qconvert never unpickles (it can run arbitrary code):"
            " convert it to safetensors first"
        )
    from .hf import open_hf

    return open_hf(spec, revision=revision)


def _is_container(path: Path) -> bool:
    from ..container.format import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
