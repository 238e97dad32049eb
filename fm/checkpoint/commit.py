"""Writing a checkpoint directory: its parts, atomic commit, ``latest``, keep-last-n, async save, verification.

The files and names are :mod:`fm.checkpoint.layout`'s.

Commit protocol: every rank writes its parts into the same temp dir (rank 0 creates it and
broadcasts its name), hashes the files it wrote (size and CRC32, in the writer thread, so an async
save overlaps it with training) and drops ``.done-rank<r>`` holding that manifest. Rank 0 waits for
all markers, writes ``COMPLETE`` with the merged manifest, renames the temp dir to ``<root>/<step>``
(atomic) and replaces ``latest`` (atomic), then deletes the oldest complete checkpoints beyond
``keep_last_n`` among those at steps up to the one just saved (after a resume from an earlier step, newer steps of
the abandoned branch may be there: they are neither counted nor deleted). A crash at any point leaves either a
temp dir or a dir without ``COMPLETE``:
:func:`find_latest` ignores both, and the next start removes the temp dirs. A save that fails removes
its temp dir. The markers are files rather than a barrier so that the whole write + commit can run in a
background thread (``async_save``) without touching the training process group.

Resume verifies a checkpoint against its manifest (:func:`verify_checkpoint`: every file there, of its
size and checksum) before reading anything from it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import secrets
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fm.checkpoint.layout import (
    COMPLETE,
    CONFIG_FILE,
    DATASET_FILE,
    LATEST,
    LOG_CKPT,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_DIR,
    RNG_FILE,
    SCHEDULER_FILE,
    TMP_PREFIX,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    CheckpointError,
    list_checkpoints,
)
from fm.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, fsync_dir

if TYPE_CHECKING:
    from fm.distributed.base import Engine
    from fm.tokenizer import TokenizerFiles

log = logging.getLogger(__name__)


Part = Callable[[Path], list[str]]
"""Writes one piece of a checkpoint into the given (temp) directory and returns the paths it wrote, relative
to that directory (they go into the manifest). Holds an already-taken snapshot."""


def torch_part(relpath: str, obj: Any) -> Part:
    """``torch.save(obj)`` at ``relpath``. ``obj`` must not change afterwards (pass a snapshot)."""

    def write(d: Path) -> list[str]:
        atomic_torch_save(obj, d / relpath)
        return [relpath]

    return write


def bytes_part(relpath: str, data: bytes) -> Part:
    def write(d: Path) -> list[str]:
        atomic_write_bytes(data, d / relpath)
        return [relpath]

    return write


def json_part(relpath: str, obj: Any) -> Part:
    """JSON file; serialised NOW, so later changes to ``obj`` do not leak into the checkpoint."""
    return bytes_part(relpath, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def copy_part(relpath: str, src: str | Path) -> Part:
    """Copy of a file, read now (later changes to it, or its removal, do not reach the checkpoint); fsynced."""
    return bytes_part(relpath, Path(src).read_bytes())


def tokenizer_part(src: str | Path | TokenizerFiles) -> Part:
    """Copy of the tokenizer: a SentencePiece model as ``tokenizer.model``, a Hugging Face tokenizer (``tokenizer.json``
    or its directory) as the directory ``tokenizer/`` holding its files (:func:`fm.tokenizer.tokenizer_files`), each
    file fsynced, and the directory. ``src``: a path (read now), or the :class:`~fm.tokenizer.TokenizerFiles` a run
    read at its start (a trainer's saves never read the tokenizer's source again)."""
    from fm.tokenizer import read_tokenizer_files

    snap = read_tokenizer_files(src)

    def write(d: Path) -> list[str]:
        if snap.kind != "hf":
            atomic_write_bytes(snap.files[0][1], d / TOKENIZER_FILE)
            return [TOKENIZER_FILE]
        return [f"{TOKENIZER_DIR}/{name}" for name in snap.write_into(d / TOKENIZER_DIR)]

    return write


def file_digest(path: str | Path) -> list:
    """``[size, crc32 hex]`` of a file (CRC32: a fast check against truncation and damage, not a signature)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return [os.path.getsize(path), f"{crc:08x}"]


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states of this process."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def read_rng_state(path: str | Path) -> dict[str, Any]:
    """An ``rng/rank<r>.pt`` file: tensors, Python's state (tuples of ints) and numpy's (an array), nothing else."""
    from fm.io import load_torch, numpy_array_globals

    return load_torch(path, allow=numpy_array_globals())


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SnapshotPart:
    """A part holding an engine :class:`~fm.distributed.base.Snapshot`: ``prepare()`` takes its CPU copy (the
    manager runs every part's ``prepare`` before writing anything), the call writes it, then the
    engine's staging buffers are released."""

    def __init__(self, snapshot: Any, write: Callable[[Path, Any], None], release: Callable[[], None]) -> None:
        self.snapshot, self.write, self.release = snapshot, write, release

    def prepare(self) -> None:
        self.snapshot.get()

    def __call__(self, d: Path) -> list[str]:
        try:
            return self.write(d, self.snapshot.get())
        finally:
            self.release()


def model_part(engine: Engine, step: int) -> Part:
    """Full model state dict from rank 0 (collective snapshot now; the file is written by rank 0 later)."""
    name = MODEL_FILE.format(step=step)

    def write(d: Path, sd: Any) -> list[str]:
        if not engine.is_main:
            return []
        atomic_torch_save(sd, d / name)
        return [name]

    return SnapshotPart(engine.snapshot_model(), write, lambda: engine.release_snapshot("model"))


def optimizer_part(engine: Engine) -> Part:
    """This rank's optimizer shard (collective snapshot now; every rank writes its part later)."""
    snap = engine.snapshot_optimizer()

    def write(d: Path, _: Any) -> list[str]:
        return [f"{OPTIMIZER_DIR}/{name}" for name in engine.write_optimizer(snap, d / OPTIMIZER_DIR)]

    return SnapshotPart(snap, write, lambda: engine.release_snapshot("optimizer"))


def standard_parts(
    engine: Engine,
    step: int,
    *,
    log_ckpt: dict[str, Any],
    dataset_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    tokenizer_path: str | Path | TokenizerFiles | None = None,
    scheduler_state: Any = None,
    save_optimizer: bool = True,
    model: Part | None = None,
) -> list[Part]:
    """Everything of the upstream layout. Collective: call on every rank at the same step. ``model``: the part
    written instead of the full model (a LoRA run's adapter files)."""
    parts = [model if model is not None else model_part(engine, step)]
    if save_optimizer:
        parts.append(optimizer_part(engine))
    parts.append(torch_part(RNG_FILE.format(rank=engine.rank), rng_state()))
    if engine.is_main:
        parts.append(json_part(LOG_CKPT, log_ckpt))
        if dataset_state is not None:
            parts.append(json_part(DATASET_FILE, dataset_state))
        if config is not None:
            parts.append(json_part(CONFIG_FILE, config))
        if model_config is not None:
            parts.append(json_part(MODEL_CONFIG_FILE, model_config))
        if tokenizer_path is not None:
            parts.append(tokenizer_part(tokenizer_path))
        if scheduler_state is not None:
            buf = io.BytesIO()
            torch.save(scheduler_state, buf)  # serialised now, as the JSON parts
            parts.append(bytes_part(SCHEDULER_FILE, buf.getvalue()))
    return parts


# ---------------------------------------------------------------- the manager
class CheckpointManager:
    """Saves checkpoints under ``root`` with an atomic commit; see the module docstring for the protocol.

    ``comm`` is the engine (rank, world size, ``broadcast_object``, ``all_gather_object``); None means
    a single process. With ``async_save`` the parts are written in a background thread; the next
    :meth:`save`, :meth:`wait` or :meth:`close` joins it and every rank raises if any rank failed.
    ``after_commit(step)`` runs on rank 0 once checkpoint ``step`` is committed (and pruned), in a background thread
    of its own, sync or async save alike, so that no rank waits for it inside the save's collectives; the next
    :meth:`save` (before it starts) or :meth:`wait` joins it. The checkpoint stands whatever it does: an exception
    there is logged, never raised.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        keep_last_n: int | None = None,
        async_save: bool = False,
        comm: Engine | None = None,
        commit_timeout_s: float = 3600.0,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        if keep_last_n is not None and keep_last_n < 1:
            raise ValueError(f"keep_last_n must be >= 1 or None, got {keep_last_n}")
        self.root = Path(root)
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self.comm = comm
        self.commit_timeout_s = commit_timeout_s
        self.after_commit = after_commit
        self.rank = comm.rank if comm is not None else 0
        self.world_size = comm.world_size if comm is not None else 1
        self._thread: threading.Thread | None = None
        self._after_thread: threading.Thread | None = None  # rank 0's after_commit of the last committed save
        self._error: BaseException | None = None
        self._tmp: Path | None = None
        self.last_saved: Path | None = None

    # -------------------------------------------------------------- public
    def save(self, step: int, parts: Sequence[Part]) -> Path:
        """Write ``parts`` as checkpoint ``step`` (collective). Returns the final directory path; ``after_commit``
        may still be running on rank 0 (the next save or :meth:`wait` joins it)."""
        self.wait()
        tmp_name = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
            tmp_name = f"{TMP_PREFIX}{step}-{secrets.token_hex(4)}"
            (self.root / tmp_name).mkdir()
        if self.comm is not None and self.world_size > 1:
            tmp_name = self.comm.broadcast_object(tmp_name, src=0)
        tmp = self.root / str(tmp_name)
        final = self.root / str(step)
        self.last_saved = final
        self._tmp = tmp
        if self.async_save:
            self._thread = threading.Thread(target=self._run, args=(step, tmp, list(parts)),
                                            name=f"checkpoint-{step}", daemon=False)
            self._thread.start()
        else:
            self._run(step, tmp, list(parts))
            self._settle(join_after=False)  # the save's collective end; after_commit goes on in its thread
        return final

    def wait(self) -> None:
        """Join the background save and (rank 0) what runs after its commit; raise on every rank if any rank's save
        failed (the save's temp dir is then removed: nothing half-written is left). Collective."""
        self._settle(join_after=True)

    def _settle(self, join_after: bool) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if join_after:
            self.join_after_commit()
        err, self._error = self._error, None
        failed = [_describe(err) if err is not None else None]
        if self.comm is not None and self.world_size > 1:
            failed = self.comm.all_gather_object(failed[0])
            self.comm.barrier()  # the commit by rank 0 is visible to everyone past this point
        if any(failed):
            if self.rank == 0 and self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
            first = next(f for f in failed if f)
            ranks = [r for r, f in enumerate(failed) if f]
            raise CheckpointError(f"checkpoint {self.last_saved} was not saved (rank(s) {ranks}): {first}; nothing "
                                  "was committed and the partial files were removed") from err

    def close(self) -> None:
        self.wait()

    def join_after_commit(self) -> None:
        """Rank 0: wait for what runs after the last commit (not collective; the end of a run that failed before
        its :meth:`wait`)."""
        if self._after_thread is not None:
            self._after_thread.join()
            self._after_thread = None

    # -------------------------------------------------------------- internals
    def _run(self, step: int, tmp: Path, parts: list[Part]) -> None:
        try:
            for part in parts:  # CPU copies first: the training loop's next optimizer step waits for them
                prepare = getattr(part, "prepare", None)
                if prepare is not None:
                    prepare()
            written: list[str] = []
            for part in parts:
                written += part(tmp)
            manifest = {rel: file_digest(tmp / rel) for rel in written}
            atomic_write_json({"files": manifest}, tmp / f".done-rank{self.rank}")
            if self.rank == 0:
                self._commit(step, tmp)
                if self.after_commit is not None:
                    self._after_thread = threading.Thread(target=self._after_commit, args=(step,),
                                                          name=f"after-checkpoint-{step}", daemon=False)
                    self._after_thread.start()
        except OSError as e:  # a full disk, a lost mount: one line that names the file and the cause
            log.error("checkpoint %d: rank %d could not write: %s", step, self.rank, _describe(e))
            self._error = e
        except BaseException as e:  # recorded; raised on every rank by wait()
            log.exception("checkpoint %d: rank %d failed", step, self.rank)
            self._error = e
            try:
                atomic_write_bytes(repr(e).encode(), tmp / f".failed-rank{self.rank}")
            except OSError:
                pass

    def _after_commit(self, step: int) -> None:
        if self.after_commit is None:
            return
        try:
            self.after_commit(step)
        except Exception as e:  # the checkpoint is committed: what runs after it must not undo the save
            log.error("checkpoint %d is saved, but what runs after the save failed: %s", step, _describe(e))

    def _wait_for_ranks(self, tmp: Path) -> None:
        deadline = time.monotonic() + self.commit_timeout_s
        want = {f".done-rank{r}" for r in range(self.world_size)}
        while True:
            names = set(os.listdir(tmp))
            failed = sorted(n for n in names if n.startswith(".failed-rank"))
            if failed:
                raise RuntimeError(f"checkpoint {tmp}: {', '.join(failed)}")
            if want <= names:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {tmp}: ranks {sorted(want - names)} did not finish writing "
                                   f"within {self.commit_timeout_s:.0f} s")
            time.sleep(0.02)

    def _commit(self, step: int, tmp: Path) -> None:
        self._wait_for_ranks(tmp)
        files: dict[str, list] = {}
        for r in range(self.world_size):
            marker = tmp / f".done-rank{r}"
            files.update(json.loads(marker.read_text())["files"])
            marker.unlink()
        atomic_write_json({"step": step, "world_size": self.world_size, "time": time.time(), "files": files},
                          tmp / COMPLETE)
        _fsync_dir(tmp)
        final = self.root / str(step)
        old = None
        if final.exists():  # re-saving a step (e.g. after resuming from an earlier one): swap, then delete
            old = self.root / f"{TMP_PREFIX}old-{step}-{secrets.token_hex(4)}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_bytes(f"{step}\n".encode(), self.root / LATEST)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(step)

    def _prune(self, keep_step: int) -> None:
        """``keep_last_n``: delete the oldest complete checkpoints at steps <= ``keep_step`` (the one just saved)
        beyond N. Steps above it are another branch of the run (saved before a resume from an earlier step): never
        counted nor deleted here, and named in a warning."""
        steps = list_checkpoints(self.root)
        newer = [s for s in steps if s > keep_step]
        if newer:
            log.warning("checkpoint %d: %s also holds newer step(s) %s, saved before this run resumed from an earlier "
                        "step (another branch): keep_last_n and merge_last_n leave them out, nothing deletes them; "
                        "remove them if they are not wanted", keep_step, self.root, newer)
        if self.keep_last_n is None:
            return
        mine = [s for s in steps if s <= keep_step]
        for s in mine[: max(len(mine) - self.keep_last_n, 0)]:
            if s != keep_step:
                shutil.rmtree(self.root / str(s), ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        remove_stale_tmp(self.root)


def remove_stale_tmp(root: str | Path) -> list[str]:
    """Remove the temp dirs of saves that never committed (a crash or a kill). Only one save of a run is in flight
    and a run directory has one writer (its lock), so outside a save every temp dir is left over."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = e.filename or getattr(e, "fm_path", None)
        return f"{where}: {e.strerror}" if where else e.strerror
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---------------------------------------------------------------- verifying checkpoints
def verify_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems with the files of checkpoint ``path`` against the manifest in its ``COMPLETE`` (missing, of
    another size, another checksum); ``[]`` when it verifies. Checkpoints of older fm versions have no manifest
    and verify trivially. With ``world_size`` > 1 each rank checks its share (every ``world_size``-th file)."""
    path = Path(path)
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return [f"{path / COMPLETE}: unreadable ({e})"]
    problems = []
    for i, (rel, (size, crc)) in enumerate(sorted(marker.get("files", {}).items())):
        if i % world_size != rank:
            continue
        p = path / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != size:
            problems.append(f"{p}: {p.stat().st_size} bytes, {size} when saved (truncated or overwritten)")
        elif file_digest(p)[1] != crc:
            problems.append(f"{p}: its contents changed since the save (CRC32 {file_digest(p)[1]}, saved {crc})")
    return problems


_fsync_dir = fsync_dir
