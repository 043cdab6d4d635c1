"""Small helpers shared by the package: atomic file writes, optional dependencies."""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

from .errors import MaskRCNNError


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a
    half-written one: write a temporary file in the same folder, fsync it, then rename."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write_with(path, write)


def atomic_write_with(path, writer) -> None:
    """Like :func:`atomic_write_bytes`, for libraries that write to a file name themselves:
    ``writer(tmp_path)`` writes the temporary file, which is then renamed over ``path``.

    A full disk, a read-only or unwritable folder (any OSError while writing) raises
    MaskRCNNError("<path>: cannot write (<reason>)"); the temporary file is removed and an
    earlier ``path`` stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise MaskRCNNError(f"{path}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise MaskRCNNError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def import_extra(module: str, extra: str, purpose: str):
    """Import ``module``, which only the pip extra ``extra`` installs.  When it is missing, raise
    MaskRCNNError ``<purpose> needs <module>, which is not installed: pip install
    'maskrcnn[<extra>]'`` (the CLI prints it as its one ``error:`` line)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        from .errors import MaskRCNNError
        raise MaskRCNNError(f"{purpose} needs {module}, which is not installed: "
                            f"pip install 'maskrcnn[{extra}]'") from None
