"""What BMTrain's modules see as ``torch.cuda`` on the CPU backend.

On a GPU, BMTrain overlaps communication with compute on side streams and orders them with events.
On the CPU every operation (including the gloo collectives that carry its NCCL calls) completes
before the next one starts, so streams and events have nothing to order: they are no-ops that keep
BMTrain's calls working. Storage types, tensor constructors and RNG state map to their CPU
counterparts; memory statistics read zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class Event:
    """``torch.cuda.Event``: already complete when recorded (CPU work is synchronous)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        del enable_timing, blocking, interprocess

    def record(self, stream: Stream | None = None) -> None:
        del stream

    def wait(self, stream: Stream | None = None) -> None:
        del stream

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class Stream:
    """``torch.cuda.Stream``: work issued "on" it has already run."""

    cuda_stream = 0

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        del device, priority, kwargs

    def wait_stream(self, stream: Stream) -> None:
        del stream

    def wait_event(self, event: Event) -> None:
        del event

    def record_event(self, event: Event | None = None) -> Event:
        return event if event is not None else Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = Stream()
_streams: list[Stream] = [_DEFAULT_STREAM]


def current_stream(device: Any = None) -> Stream:
    del device
    return _streams[-1]


@contextlib.contextmanager
def stream(s: Stream | None) -> Iterator[None]:
    _streams.append(s if s is not None else _streams[-1])
    try:
        yield
    finally:
        _streams.pop()


def synchronize(device: Any = None) -> None:
    del device


def set_device(device: Any) -> None:
    del device


def current_device() -> int:
    return 0


def device_count() -> int:
    return 1


def get_rng_state(device: Any = None) -> torch.Tensor:
    """The generator that device-side dropout draws from: on the CPU backend, the CPU generator."""
    del device
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
    del device
    torch.set_rng_state(state)


def memory_allocated(device: Any = None) -> int:
    del device
    return 0


max_memory_allocated = memory_allocated


def memory_summary(device: Any = None, abbreviated: bool = False) -> str:
    del device, abbreviated
    return "(CPU backend: no device memory)"


def reset_peak_memory_stats(device: Any = None) -> None:
    del device


FloatTensor = torch.FloatTensor
FloatStorage, DoubleStorage, HalfStorage = torch.FloatStorage, torch.DoubleStorage, torch.HalfStorage
BFloat16Storage, CharStorage, ByteStorage = torch.BFloat16Storage, torch.CharStorage, torch.ByteStorage
ShortStorage, IntStorage, LongStorage = torch.ShortStorage, torch.IntStorage, torch.LongStorage
