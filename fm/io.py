"""Files fm writes and reads: atomic writes, and loads that never run code from a file.

Writes: a temp file in the target's directory, fsync, then rename over the target. A crash leaves
either the old file or the new one, never a half-written file under the real name. Everything written gets
the user's umask (``0644``/``0755`` by default), as a plain ``open``/``mkdir`` would: ``mkstemp`` and
``mkdtemp`` alone give ``0600``/``0700``, which teammates and a serving container cannot read.

Reads: a checkpoint someone sends you must never be a program. :func:`load_torch` reads torch files
with ``weights_only`` (tensors and plain data) plus exactly the extra globals a caller names; a file
that needs anything else is refused for safety (:class:`UnsafeFileError`), and a truncated or damaged
one is named as such (:class:`CorruptFileError`). :func:`load_pickle` does the same for plain pickles
(torch.distributed.checkpoint's ``.metadata``) against an explicit allow-list.
"""

from __future__ import annotations

import enum
import io
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from fm.errors import FmError


class UnsafeFileError(FmError, ValueError):
    """A file was refused because loading it would run code or build objects fm does not allow."""


class CorruptFileError(FmError, ValueError):
    """A file is truncated or damaged (its message names it)."""


def umask() -> int:
    """The process umask, read without changing it (Linux: /proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def as_if_created(path: str | Path, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def make_temp_dir(prefix: str, parent: str | Path) -> Path:
    """``mkdtemp`` in ``parent`` with the permissions ``mkdir`` would give (not 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    as_if_created(d, directory=True)
    return d


class atomic_dir:  # noqa: N801 - used as a context manager, like open()
    """Build a directory under a temp name beside ``target`` and rename it into place on success (an existing
    target is replaced only with ``overwrite``); on an error the temp directory is removed."""

    def __init__(self, target: str | Path, overwrite: bool = False, what: str = "--output"):
        self.target, self.overwrite, self.what = Path(target), overwrite, what

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise FileExistsError(f"{self.target} exists: choose another {self.what} or pass --overwrite")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_temp_dir(f".{self.target.name}.tmp-", self.target.parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)


class _Writes(io.RawIOBase):
    """A file that remembers the first OS error of a write: torch.save turns one into an opaque RuntimeError."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a binary temp file beside ``path``, fsync it, rename it to ``path``. An OS error (a
    full disk) is raised as an ``OSError`` naming ``path``; the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Writes(raw)
            try:
                write(f)
                raw.flush()
                os.fsync(raw.fileno())
            except BaseException as e:
                err = f.error or (e if isinstance(e, OSError) else None)
                if err is not None:
                    raise OSError(err.errno, err.strerror, str(path)) from e
                raise
        as_if_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    atomic_write(path, lambda f: f.write(data))


def fsync_dir(path: str | Path) -> None:
    """fsync a directory (its entries: files renamed or created in it survive a crash); errors are ignored (some
    filesystems refuse to open or fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_bytes((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode(), path)


def load_torch(path: str | Path, *, allow: Iterable[Any] = (), mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` that runs no code from the file: tensors and plain data, plus exactly the globals in
    ``allow`` (classes or functions the caller knows the file needs). ``mmap`` falls back to a plain read for
    files in torch's legacy format. Raises :class:`UnsafeFileError` / :class:`CorruptFileError` naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allow)):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not (mmap and "mmap can only be used with files saved" in str(exc)):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CorruptFileError(f"{path}: damaged ({_first_line(exc)})") from exc
        raise UnsafeFileError(f"{path}: refused for safety: loading it would run code or build objects that a "
                              f"checkpoint does not need ({_refused_global(exc)}); fm never unpickles arbitrary "
                              "objects from a file") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CorruptFileError(f"{path}: not a complete torch file ({type(exc).__name__}: {_first_line(exc)}); it is "
                               "truncated or damaged") from exc


def numpy_array_globals() -> list[Any]:
    """What a pickled numpy array (e.g. numpy's RNG state) needs; nothing in it can run code."""
    import numpy as np

    kinds = (np.uint32, np.int64, np.int32, np.uint8, np.float64, np.float32, np.bool_)
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, *(type(np.dtype(k)) for k in kinds)]


def load_pickle(path: str | Path, allow: Iterable[tuple[str, str]], data: bytes | None = None) -> Any:
    """A plain pickle whose globals must all be in ``allow`` (``(module, name)`` pairs); anything else is refused
    for safety (:class:`UnsafeFileError`). ``data``: the bytes, when already read."""
    allowed = set(allow)

    def refuse(what: str) -> UnsafeFileError:
        return UnsafeFileError(f"{path}: refused for safety: it asks for {what}, which this kind of file never holds; "
                               "fm never unpickles arbitrary objects from a file")

    def enum_member(cls: Any, name: Any) -> Any:
        # Python 3.11.0-3.11.4 pickle an Enum member as getattr(EnumClass, "NAME") (later ones by value): allowed
        # for a member of an allowed Enum class, and for nothing else getattr could reach.
        if not (isinstance(cls, enum.EnumMeta) and isinstance(name, str) and name in cls.__members__):
            raise refuse(f"getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r})")
        return cls[name]

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("builtins", "getattr"):
                return enum_member
            if (module, name) not in allowed:
                raise refuse(f"{module}.{name}")
            return super().find_class(module, name)

    raw = data if data is not None else Path(path).read_bytes()
    try:
        return Restricted(io.BytesIO(raw)).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{path}: damaged ({type(exc).__name__}: {_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _refused_global(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line or "Can only build" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")[:200]
    return _first_line(exc)
