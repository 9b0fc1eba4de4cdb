"""Where results are written: never onto an input, never over a file without being asked,
and no temporary files left behind by runs that were killed.

Every writer (container, GGUF, importance matrix) writes ``.NAME.tmp-PID`` beside its output
and renames it over the output only once complete. A run killed with SIGKILL cannot remove its
temporary file, so the next run that writes beside it removes those whose process is gone.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

from .errors import QConvertError


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_temps(output: str | Path) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files beside ``output`` whose process no longer exists
    (runs killed before they could clean up); returns the paths removed."""
    output = Path(output)
    removed = []
    for path in output.parent.glob(f".{glob.escape(output.name)}.tmp-*"):
        pid_text = path.name.rsplit("-", 1)[1]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _process_exists(int(pid_text)):
            continue
        try:
            path.unlink()
        except OSError:  # removed meanwhile, or not ours to remove: leave it
            continue
        removed.append(path)
    return removed


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(output: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output path that would lose data: an input file itself, a file inside an input
    folder, a directory, or (without ``force``) any existing file."""
    output = Path(output)
    if output.is_dir():
        raise QConvertError(f"output {output} is a directory; give a file path, e.g. -o {output / 'model.q'}")
    for spec in inputs:
        source = Path(spec).expanduser()
        if not source.exists():  # a hub id, or a file the reader will report as missing
            continue
        if _same_file(output, source):
            raise QConvertError(f"output {output} is the input {spec} itself; writing it would destroy the input")
        if source.is_dir() and output.exists() and source.resolve() in output.resolve().parents:
            raise QConvertError(f"output {output} is a file of the input folder {spec}; writing it would destroy the input")
    if output.exists() and not force:
        raise QConvertError(f"output {output} already exists; pass --force to overwrite it")
    return output
