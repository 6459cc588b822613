"""Writing outputs safely, for every verb: the folder is tried before the work starts, files are written to a
temporary name and renamed, several outputs are written all or none, an input is never overwritten."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from smallify.errors import OutputError


def check_writable(path: str | os.PathLike, inputs=()) -> Path:
    """Fail early, before any long work, when ``path`` cannot be written or would overwrite one of ``inputs``.

    The folder is tried for real: a probe file is created and removed (``os.access`` says yes for root on
    /proc, /sys and read-only bind mounts where creating a file fails)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory; give a file name such as {path / 'model.int8.onnx'}")
    for source in inputs:
        if source is not None and isinstance(source, (str, os.PathLike)) and _same_file(path, Path(source)):
            raise OutputError(f"output path {path} is the input file {source}; smallify never overwrites its input: "
                              f"give another name, e.g. {path.with_name(path.stem + '.small' + path.suffix)}")
    probe_folder(path, parent)
    return path


def probe_folder(path: Path, parent: Path) -> None:
    """OutputError unless a file can really be created (and is removed again) in ``parent``, ``path``'s folder."""
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: creating a file in {parent} failed ({e.strerror or e}); "
                          "give a path in a folder you can write") from None
    os.close(fd)
    os.unlink(probe)


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (symlinks resolved, hard links compared by inode)."""
    try:
        if not b.exists():          # an input that is not there cannot be overwritten (its own error follows)
            return False
        return os.path.samefile(a, b) if a.exists() else a.resolve() == b.resolve()
    except OSError:
        return False


def write_atomic(path: str | os.PathLike, write, inputs=()) -> Path:
    """Call ``write(temporary path)`` beside ``path``, then rename the result onto ``path`` (never one of
    ``inputs``); the temporary file is removed on any failure, Ctrl-C included."""
    path = check_writable(path, inputs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_all(writers: dict, inputs=()) -> list[Path]:
    """Several outputs of one command, all or none: ``writers`` maps each path to ``write(temporary path)``.
    Every path is checked before anything is written; each output goes to a temporary file beside it, and the
    files are renamed into place only once every one of them was written (temporary files removed on any
    failure, Ctrl-C included)."""
    paths = {check_writable(p, inputs): write for p, write in writers.items()}
    temps: dict[Path, str] = {}
    try:
        for path, write in paths.items():
            fd, temps[path] = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
            os.close(fd)
            write(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise
    return list(paths)
