"""Executors for `data prepare`: the same task functions in this process, a process pool, or Ray.

`map(fn, tasks)` yields `(task[0], fn(*task))` as tasks finish, in any order; callers key the
results by shard, so the output never depends on which executor or how many workers ran them.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from lmforge.errors import UserError


class LocalRunner:
    """Runs tasks in this process (1 worker) or a process pool; yields (shard, result) as tasks finish."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def map(self, fn: Any, tasks: list[tuple]) -> Any:
        if self.workers == 1 or len(tasks) <= 1:
            return ((task[0], fn(*task)) for task in tasks)
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=self.workers)
        return self._parallel(fn, tasks)

    def _parallel(self, fn: Any, tasks: list[tuple]) -> Any:
        futures = {self.pool.submit(fn, *task): task[0] for task in tasks}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield futures[future], future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class RayRunner:
    """The same tasks as Ray tasks: a local Ray instance, or the cluster named by RAY_ADDRESS.

    On a cluster the output and work directories must be on storage every node sees.
    """

    def __init__(self, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'lmforge[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)

    def map(self, fn: Any, tasks: list[tuple]) -> Any:
        remote = self.ray.remote(fn)
        refs = {remote.remote(*task): task[0] for task in tasks}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], self.ray.get(ref)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
