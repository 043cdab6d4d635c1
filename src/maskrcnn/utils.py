"""Small helpers shared by the package: atomic file writes, optional dependencies, reading
ahead and writing behind in background threads."""
from __future__ import annotations

import collections
import importlib
import os
import queue
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

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


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or taskset's share,
    not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def batches(items, size: int):
    """Consecutive lists of up to ``size`` items of an iterable, read lazily."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_ahead(items: Iterable, depth: int) -> Iterator:
    """The items of ``items`` in order, produced up to ``depth`` ahead by a background thread,
    so that reading (decoding an image, a video frame) overlaps the caller's work on the items
    before.  ``depth`` 0 reads in the caller's thread.  An exception raised while producing
    an item is raised here, after the items before it; stopping early (an exception, or
    closing the generator) stops the thread after the item it is producing."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # raised in the caller's thread
            put((end, e))
            return
        put((end, None))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


class WriteBehind:
    """Run ``fn(*args)`` calls (drawing and writing pictures, encoding results) in ``workers``
    background threads while the caller goes on, and hand their results back in the order the
    calls were submitted.  At most ``pending`` calls (default ``workers``) are queued or
    running: submitting more waits for the oldest, so the memory held stays bounded (each call
    holds its arguments: for ``detect``, an image and its full-size masks).  An exception of a call is raised
    by the :meth:`submit` or :meth:`finish` that reaches it.  ``workers`` 0 runs each call at
    once in the caller's thread.  Use as a context manager; leaving it waits for every call
    (and on an exception, cancels the ones not started)."""

    def __init__(self, workers: int, pending: int | None = None):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="write-behind") if workers > 0 else None
        self.pending = max(1, pending if pending is not None else workers)
        self.futures: collections.deque = collections.deque()

    def submit(self, fn: Callable, *args) -> list:
        """Queue ``fn(*args)``; returns the results of the oldest calls that have finished
        (waiting for them while more than ``pending`` are queued), oldest first."""
        if self.pool is None:
            return [fn(*args)]
        self.futures.append(self.pool.submit(fn, *args))
        done = []
        while self.futures and (len(self.futures) > self.pending or self.futures[0].done()):
            done.append(self.futures.popleft().result())
        return done

    def finish(self) -> list:
        """Wait for every submitted call; their results, oldest first."""
        done = []
        while self.futures:
            done.append(self.futures.popleft().result())
        return done

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        try:
            if kind is None:
                self.finish()
        finally:
            if self.pool is not None:
                for future in self.futures:
                    future.cancel()
                self.pool.shutdown(wait=True)
        return False
