"""Where points run: worker processes on this machine, or an existing Dask cluster.

Both are context managers whose :meth:`results` takes a function and items and yields
``(item, result)`` as results arrive, so the caller can store each one at once; the
order of arrival does not matter because every result depends on its item alone. The
workers live as long as the ``with`` block, so a planner's successive batches do not
pay for starting them again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from moesim.cores import cores

T = TypeVar("T")
CONNECT_TIMEOUT = "10s"  # to reach a Dask scheduler


def default_workers() -> int:
    """One worker per core this process may use."""
    return cores()


def _share_cores(threads: int) -> None:
    """Worker start: the compiled routing loops (``moesim.routing.kernels``) use
    ``threads`` threads, so that the workers together do not ask for more threads than
    there are cores. Results do not depend on the number of threads."""
    os.environ["MOESIM_THREADS"] = str(threads)


class LocalExecutor:
    """``workers`` processes on this machine (1: everything in this process)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._pool = None

    def __enter__(self) -> LocalExecutor:
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # forkserver: workers start clean, without the parent's threads or files.
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("forkserver"),
                initializer=_share_cores,
                initargs=(max(1, default_workers() // self.workers),))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def results(self, function: Callable[[T], Any], items: Iterable[T]) \
            -> Iterator[tuple[T, Any]]:
        items = list(items)
        if self._pool is None or len(items) <= 1:
            for item in items:
                yield item, function(item)
            return
        from concurrent.futures import as_completed

        futures = {self._pool.submit(function, item): item for item in items}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()


class DaskExecutor:
    """The workers of the Dask distributed scheduler at ``address``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = None

    def __enter__(self) -> DaskExecutor:
        from distributed import Client

        from moesim.errors import InputError

        try:
            self._client = Client(self.address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as err:
            raise InputError(f"cannot reach a Dask scheduler at {self.address!r}: {err}",
                             field="--scheduler",
                             allowed="the address of a running dask scheduler, "
                                     "e.g. tcp://10.0.0.1:8786") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def results(self, function: Callable[[T], Any], items: Iterable[T]) \
            -> Iterator[tuple[T, Any]]:
        from distributed import as_completed

        items = list(items)
        if not items:
            return
        # pure=False: equal points of two sweeps are still two tasks of their own.
        futures = self._client.map(function, items, pure=False)
        index = {future.key: item for future, item in zip(futures, items, strict=True)}
        try:
            for future in as_completed(futures):
                yield index[future.key], future.result()
        finally:
            self._client.cancel(futures)


def executor(*, scheduler: str | None = None, workers: int | None = None):
    """A Dask executor for ``scheduler``, else local processes."""
    return DaskExecutor(scheduler) if scheduler is not None else LocalExecutor(workers)
