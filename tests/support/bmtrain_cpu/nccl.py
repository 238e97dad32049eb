"""``bmtrain.nccl`` on the CPU backend: BMTrain 1.0.1's NCCL wrappers carried by gloo.

Loaded as the module ``bmtrain.nccl`` (see ``tests.support.bmtrain_cpu``). Every function keeps
the signature and argument checks of the original in ``bmtrain/nccl/__init__.py``; where the
original passes storage pointers to ``bmtrain.C`` (NCCL), this one moves the same elements with a
gloo process group:

* one gloo group per communicator, rendezvoused under the NCCL unique id through the TCP store
  that ``torch.distributed.rendezvous`` started for ``bmt.init_distributed`` (MASTER_ADDR/PORT);
* before every collective the ranks exchange (operation, element count, dtype, root) and raise on
  any difference. NCCL would hang (or read past a buffer) there; here the test fails and says why;
* inside ``groupStart()``/``groupEnd()`` operations are queued and run at ``groupEnd()``, as NCCL
  defers them;
* data moves as raw bytes (so every dtype goes through, bit for bit); reductions are computed
  locally from every rank's contribution in rank order, in fp32 for fp16/bf16 (rounded once), so
  every rank gets the identical result, as with NCCL. The summation order differs from NCCL's ring,
  which can change the last bit of an fp32 sum over three or more ranks.
"""

from __future__ import annotations

import atexit
import datetime
import os
import secrets
import weakref
from typing import Literal

import torch
import torch.distributed as dist
from bmtrain.nccl.enums import (
    ncclAvg,
    ncclBFloat16,
    ncclBool,
    ncclDouble,
    ncclFloat,
    ncclFloat16,
    ncclFloat32,
    ncclFloat64,
    ncclHalf,
    ncclInt8,
    ncclInt32,
    ncclInt64,
    ncclMax,
    ncclMin,
    ncclProd,
    ncclSum,
    ncclUint8,
)

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("FM_BMTRAIN_CPU_TIMEOUT_S", "300")))
_OPCODES = {"allReduce": 1, "broadcast": 2, "reduce": 3, "allGather": 4, "reduceScatter": 5, "send": 6, "recv": 6}
_HALF = (torch.float16, torch.bfloat16)


class NCCLCommunicator:
    """NCCL communicator: here a gloo process group (``None`` for a world of one) and this rank's place in it."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int) -> None:
        self._group, self._rank, self._size = group, rank, size
        self._destroyed = False
        if group is not None:
            _live.add(self)

    @property
    def ptr(self) -> NCCLCommunicator:
        if self._destroyed:
            raise RuntimeError("NCCL Communicator is already destroyed")
        return self

    def _destroy_ptr(self) -> None:
        self._destroyed = True


# utils (as the original)
def dtype2nccl(dtype: torch.dtype) -> int:
    MAP = {
        torch.int8: ncclInt8, torch.uint8: ncclUint8, torch.int32: ncclInt32, torch.int: ncclInt32,
        torch.int64: ncclInt64, torch.float16: ncclFloat16, torch.half: ncclHalf, torch.bfloat16: ncclBFloat16,
        torch.float32: ncclFloat32, torch.float: ncclFloat, torch.float64: ncclFloat64, torch.double: ncclDouble,
        torch.bool: ncclBool,
    }  # fmt: skip
    if dtype not in MAP:
        raise TypeError(f"Unsupport dtype {dtype}")
    return MAP[dtype]


def op2nccl(op: Literal["sum", "prod", "max", "min", "avg"]) -> int:
    codes = {"sum": ncclSum, "prod": ncclProd, "max": ncclMax, "min": ncclMin, "avg": ncclAvg}
    if op not in codes:
        raise ValueError("Unknown gather op %s")
    return codes[op]


# ---------------------------------------------------------------------------------------- plumbing
_live: weakref.WeakSet[NCCLCommunicator] = weakref.WeakSet()


@atexit.register
def _shutdown_live_groups() -> None:
    """Destroy the gloo groups BMTrain never destroys (it keeps its communicators for the process's life).

    A gloo worker thread drops its reference to a finished collective a moment after ``wait()`` returns; when that
    is the last reference to a tensor Python has seen, the thread takes the GIL to release the Python object. If
    the interpreter is finalizing by then, taking the GIL ends the thread (``pthread_exit``) inside a noexcept
    destructor and the finished process aborts ("terminate called without an active exception"). Destroying the
    group before finalization joins its threads with the GIL released, so they finish that release first."""
    for comm in list(_live):
        if not comm._destroyed:
            commDestroy(comm)


_store: dist.Store | None = None
_group_depth = 0
_queued: list = []


def _tcp_store() -> dist.Store:
    """A client of the store ``bmt.init_distributed`` rendezvoused with (rank 0 serves it on MASTER_PORT)."""
    global _store
    if _store is None:
        _store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=TIMEOUT)
    return _store


def _flat(storage: torch.TypedStorage) -> torch.Tensor:
    """The whole storage as a 1-D tensor (what NCCL reads or writes through the storage's pointer)."""
    return torch.tensor([], dtype=storage.dtype, device=storage.device).set_(storage)


def _on_device(storage: torch.TypedStorage) -> bool:
    return storage.device.type == "cpu"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _allgather(comm: NCCLCommunicator, t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape and dtype on every rank), in rank order."""
    if comm._group is None:
        return [t.clone()]
    raw = _bytes(t)
    outs = [torch.empty_like(raw) for _ in range(comm._size)]
    if raw.numel():
        comm._group.allgather([outs], [raw]).wait()
    return [o.view(t.dtype).view(t.shape) if t.numel() else t.new_empty(t.shape) for o in outs]


def _agree(comm: NCCLCommunicator, name: str, count: int, dtype: torch.dtype, root: int = -1) -> None:
    """Raise on every rank unless all ranks issue the same operation with the same count, dtype and root."""
    if comm._group is None:
        return
    mine = torch.tensor([_OPCODES[name], count, dtype2nccl(dtype), root], dtype=torch.int64)
    rows = [r.tolist() for r in _allgather(comm, mine)]
    if any(r != rows[0] for r in rows):
        names = {v: k for k, v in _OPCODES.items()}
        seen = ", ".join(f"rank {i}: {names.get(r[0], r[0])} count={r[1]} dtype={r[2]} root={r[3]}"
                         for i, r in enumerate(rows))
        raise RuntimeError(f"NCCL {name}: the ranks of a communicator issued different collectives ({seen}); "
                           "NCCL would hang or corrupt memory here")


def _reduce(parts: list[torch.Tensor], op: str) -> torch.Tensor:
    work = [p.float() for p in parts] if parts[0].dtype in _HALF else parts
    acc = work[0].clone()
    for p in work[1:]:
        if op in ("sum", "avg"):
            acc = acc + p if acc.dtype != torch.bool else acc | p
        elif op == "prod":
            acc = acc * p if acc.dtype != torch.bool else acc & p
        elif op == "max":  # NCCL's fmaxf/fminf: a NaN loses to a number
            acc = torch.fmax(acc, p) if acc.is_floating_point() else torch.maximum(acc, p)
        elif op == "min":
            acc = torch.fmin(acc, p) if acc.is_floating_point() else torch.minimum(acc, p)
    if op == "avg":
        acc = acc / len(parts)
    return acc.to(parts[0].dtype)


def _run(fn, *args) -> None:
    """Run now, or at ``groupEnd()`` inside a group (NCCL defers grouped operations)."""
    if _group_depth > 0:
        _queued.append((fn, args))
    else:
        fn(*args)


# ---------------------------------------------------------------------------------------- wrappers
def getUniqueId() -> bytes:
    """NCCL API: ``ncclGetUniqueId`` (128 bytes that name a communicator to be)."""
    return secrets.token_bytes(128)


def commInitRank(unique_id: bytes, world_size: int, rank: int) -> NCCLCommunicator:
    """NCCL API: ``ncclCommInitRank``: a gloo group of ``world_size`` ranks that share ``unique_id``."""
    assert rank >= 0 and rank < world_size, "rank must be between 0 and world_size-1"
    if world_size == 1:
        return NCCLCommunicator(None, 0, 1)
    store = dist.PrefixStore(f"fm-bmtrain-cpu/{unique_id.hex()}", _tcp_store())
    return NCCLCommunicator(dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT), rank, world_size)


def commDestroy(comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclCommDestroy``."""
    group = comm.ptr._group
    if group is not None:
        group.shutdown()
    # shutdown() leaves gloo's worker threads running; dropping the last reference destroys the group, which joins
    # them (with the GIL released)
    comm._group = None
    comm._destroy_ptr()


def commCount(comm: NCCLCommunicator) -> int:
    """NCCL API: ``ncclCommCount``."""
    return comm.ptr._size


def commRank(comm: NCCLCommunicator) -> int:
    """NCCL API: ``ncclCommUserRank``."""
    return comm.ptr._rank


def allReduce(src: torch.TypedStorage, dst: torch.TypedStorage, op: Literal["sum", "prod", "max", "min", "avg"],
              comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclAllReduce``. src and dst: same size and type; src == dst is in place."""
    assert src.dtype == dst.dtype, "send and recv buffers must be the same time"
    assert _on_device(src) and _on_device(dst)
    op2nccl(op)
    assert src.size() == dst.size(), "Buffer size not aligned"

    def run() -> None:
        _agree(comm.ptr, "allReduce", src.size(), src.dtype)
        _flat(dst).copy_(_reduce(_allgather(comm, _flat(src)), op))

    _run(run)


def send(src: torch.TypedStorage, peer: int, comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclSend`` (the peer must call :func:`recv` with the same count and dtype)."""

    def run() -> None:
        header = torch.tensor([_OPCODES["send"], src.size(), dtype2nccl(src.dtype), comm.ptr._rank])
        comm._group.send([header], peer, 0).wait()
        if src.size():
            comm._group.send([_bytes(_flat(src))], peer, 1).wait()

    _run(run)


def recv(dst: torch.TypedStorage, peer: int, comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclRecv``."""

    def run() -> None:
        header = torch.empty(4, dtype=torch.int64)
        comm.ptr._group.recv([header], peer, 0).wait()
        if header[1].item() != dst.size() or header[2].item() != dtype2nccl(dst.dtype):
            raise RuntimeError(f"NCCL recv from rank {peer}: it sent {header[1].item()} elements of NCCL type "
                               f"{header[2].item()}, this rank expects {dst.size()} of {dtype2nccl(dst.dtype)}")
        if dst.size():
            buf = torch.empty(dst.size() * dst.element_size(), dtype=torch.uint8)
            comm._group.recv([buf], peer, 1).wait()
            _flat(dst).copy_(buf.view(dst.dtype))

    _run(run)


def broadcast(src: torch.TypedStorage, dst: torch.TypedStorage, root: int, comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclBroadcast``. src and dst: same size and type; src == dst is in place."""
    assert src.dtype == dst.dtype, "send and recv buffers must be the same time"
    assert _on_device(src) and _on_device(dst)
    assert dst.size() == src.size(), "Buffer size not aligned"

    def run() -> None:
        _agree(comm.ptr, "broadcast", src.size(), src.dtype, root)
        _flat(dst).copy_(_allgather(comm, _flat(src))[root])

    _run(run)


def reduce(src: torch.TypedStorage, dst: torch.TypedStorage, op: Literal["sum", "prod", "max", "min", "avg"],
           root: int, comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclReduce`` (the result lands in ``dst`` on ``root`` only)."""
    assert src.dtype == dst.dtype, "send and recv buffers must be the same time"
    assert _on_device(src) and _on_device(dst)
    op2nccl(op)
    assert dst.size() == src.size(), "Buffer size not aligned"

    def run() -> None:
        _agree(comm.ptr, "reduce", src.size(), src.dtype, root)
        out = _reduce(_allgather(comm, _flat(src)), op)
        if comm._rank == root:
            _flat(dst).copy_(out)

    _run(run)


def allGather(src: torch.TypedStorage, dst: torch.TypedStorage, comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclAllGather``: ``dst`` receives every rank's ``src.size()`` elements in rank order."""
    assert src.dtype == dst.dtype, "send and recv buffers must be the same time"
    assert _on_device(src) and _on_device(dst)
    sendcount = src.size()

    def run() -> None:
        _agree(comm.ptr, "allGather", sendcount, src.dtype)
        assert dst.size() % sendcount == 0, "Buffer size not aligned"
        if dst.size() < sendcount * comm._size:
            raise RuntimeError(f"NCCL allGather: the receive buffer holds {dst.size()} elements, "
                               f"{comm._size} ranks x {sendcount} need {sendcount * comm._size}")
        parts = _allgather(comm, _flat(src))
        _flat(dst)[: sendcount * comm._size].copy_(torch.cat(parts))

    _run(run)


def reduceScatter(src: torch.TypedStorage, dst: torch.TypedStorage, op: Literal["sum", "prod", "max", "min", "avg"],
                  comm: NCCLCommunicator) -> None:
    """NCCL API: ``ncclReduceScatter``: rank ``i``'s ``dst`` gets block ``i`` of the reduced ``src``."""
    assert src.dtype == dst.dtype, "send and recv buffers must be the same time"
    assert _on_device(src) and _on_device(dst)
    recvcount = dst.size()
    op2nccl(op)

    def run() -> None:
        _agree(comm.ptr, "reduceScatter", recvcount, src.dtype)
        assert src.size() % recvcount == 0, "Buffer size not aligned"
        if src.size() < recvcount * comm._size:
            raise RuntimeError(f"NCCL reduceScatter: the send buffer holds {src.size()} elements, "
                               f"{comm._size} ranks x {recvcount} need {recvcount * comm._size}")
        whole = _flat(src)[: recvcount * comm._size]
        out = _reduce(_allgather(comm, whole), op)
        _flat(dst).copy_(out[comm._rank * recvcount:(comm._rank + 1) * recvcount])

    _run(run)


def groupStart() -> None:
    """NCCL API: ``ncclGroupStart``: queue the following operations until :func:`groupEnd`."""
    global _group_depth
    _group_depth += 1


def groupEnd() -> None:
    """NCCL API: ``ncclGroupEnd``: run the queued operations (in the order they were issued)."""
    global _group_depth
    _group_depth -= 1
    if _group_depth == 0:
        ops = list(_queued)
        _queued.clear()
        for fn, args in ops:
            fn(*args)
