"""Where a study's cells run: one after another in this process, in local worker processes (`--jobs N`), or as Ray
tasks (`--executor ray`). Every executor runs the same `run_cell` on the same spec, and each cell's threads are the
study's threads divided between the jobs, so a cell computes the same numbers whichever executor ran it."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from craft_deploy import CraftError
from craft_deploy.study.cells import run_cell, write_cell


def threads_per_cell(threads: int | None, jobs: int) -> int:
    return max(1, (threads or os.cpu_count() or 1) // jobs)


def execute(
    specs: list[dict[str, Any]], root: str, executor: str, jobs: int, threads: int | None, address: str | None = None
) -> Iterator[dict[str, Any]]:
    """Run every spec and yield each cell's record as it finishes (in completion order)."""
    per_cell = threads_per_cell(threads, jobs)
    if not specs:
        return
    if executor == "ray":
        yield from _ray(specs, root, jobs, per_cell, address)
    elif jobs == 1:
        for spec in specs:
            yield run_cell(spec, root, per_cell)
    else:
        yield from _processes(specs, root, jobs, per_cell)


def _processes(specs: list[dict[str, Any]], root: str, jobs: int, per_cell: int) -> Iterator[dict[str, Any]]:
    """Local worker processes (spawned: no forked torch state). If a worker dies (killed, out of memory), the pool
    cannot say which cell it ran: every cell not finished by then is recorded as failed with that reason, and
    `--retry-failed` runs them again."""
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_cell, spec, root, per_cell): spec for spec in specs}
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in done:
                spec = futures.pop(fut)
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    yield write_cell(root, spec, status="error",
                                     error="a study worker process died before this cell finished (killed or out of "
                                     "memory); rerun the study with --retry-failed")  # fmt: skip


def _ray(specs: list[dict[str, Any]], root: str, jobs: int, per_cell: int, address: str | None):
    try:
        import ray
    except ImportError:
        raise CraftError("--executor ray needs Ray: pip install 'craft-deploy[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": jobs * per_cell}))  # fmt: skip
    try:
        task = ray.remote(num_cpus=per_cell, max_retries=0)(run_cell)
        refs = {task.remote(spec, root, per_cell): spec for spec in specs}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                spec = refs.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as e:  # the task's process died: a failed cell
                    yield write_cell(root, spec, status="error", error=f"ray task failed: {type(e).__name__}: {e}")
    finally:
        if started:
            ray.shutdown()
