"""The zoo on Ray: each fine-tuning run is one Ray task, on this machine or on a cluster.

    wildpdiff zoo --data /shared/data --store /shared/store --executor ray [--ray-address auto] [--run-gpus 0.25]

The task calls the local executor's run function (`training.zoo._run`), so the checkpoints are the same
bytes; the driver (the `wildpdiff` process) alone writes the manifest and registers a run once its task
returned. Ray restarts a run whose worker process or node died (`Executor.retries` times), never one that
raised: such an error (a dataset path the worker cannot read) is reported at once, naming the run.

Shared filesystem: workers read the dataset and write checkpoints at the driver's absolute paths, so every
node must mount the dataset and the store there (NFS, a cloud file share, a ReadWriteMany volume under
KubeRay) and have this project installed in the same Python environment. Ray is an optional extra
(`pip install '.[ray]'`), imported only here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

from model_store.store import StoreError
from training.data import DataError
from training.zoo import Executor, ExecutorError, RunJob, _die_with_parent, _run

INSTALL_HINT = "--executor ray needs Ray, an optional extra: pip install '.[ray]' (or pip install 'ray>=2.9')"


def job_runner(executor: Executor) -> Callable[[list[RunJob]], Iterator] | None:
    """`collect_zoo`'s `run_jobs` for an executor: None (the local pool) or the Ray runner."""
    return None if executor.kind == "local" else partial(ray_runs, executor=executor)


def require_ray():
    """The `ray` module, or an ExecutorError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(INSTALL_HINT) from None
    return ray


def _ray_run(job: RunJob) -> tuple[RunJob, list[str], dict]:
    """The Ray task: a run that dies with its node's raylet, as a pool worker with its zoo process. A local Ray
    goes down with a killed driver, and its busy workers would otherwise write checkpoints for many seconds
    more; on a cluster, Ray itself stops the tasks of a driver that is gone."""
    _die_with_parent(os.getppid())
    return _run(job)


def cluster_job(job: RunJob, executor: Executor) -> RunJob:
    """The job as a task on another node runs it: absolute paths (a worker's working folder is its own), the run's
    device and threads from the resources it was given."""

    paths = {name: getattr(job.spec, name) for name in ("root", "images", "backgrounds")}
    spec = replace(job.spec, **{name: path.resolve() for name, path in paths.items() if path is not None})
    return replace(
        job,
        spec=spec,
        store=str(Path(job.store).resolve()),
        device="cuda" if executor.run_gpus > 0 else "cpu",
        threads=max(1, int(executor.run_cpus)),
    )


def ray_runs(todo: list[RunJob], executor: Executor) -> Iterator[tuple[RunJob, list[str], dict]]:
    """Finished runs, in the order they finish. Joins the cluster at `executor.ray_address`, or starts a local Ray
    (stopped again at the end) when none is given and this process is not connected yet."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=executor.ray_address)
        except ConnectionError as err:  # no cluster at that address
            raise ExecutorError(f"cannot join the Ray cluster at {executor.ray_address!r}: {first_line(err)}") from None
    task = ray.remote(_ray_run).options(
        num_cpus=executor.run_cpus,
        num_gpus=executor.run_gpus,
        max_retries=executor.retries,
        retry_exceptions=False,  # an error the run raised would only come back
    )
    pending = {task.remote(cluster_job(job, executor)): job for job in todo}
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            try:
                finished = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                raise failure(job, err) from None
            except ray.exceptions.RayError as err:  # died more often than retried, node lost, out of memory
                raise ExecutorError(f"{where(job)} did not finish on Ray: {first_line(err)}") from None
            yield finished
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def failure(job: RunJob, err: Exception) -> Exception:
    """The error a run raised on a worker (`err`: Ray's wrapper of it) as the command line reports it: one line."""
    cause = err.cause
    message = f"{where(job)} failed on a Ray worker: {cause}"
    if isinstance(cause, (DataError, OSError)):
        return DataError(f"{message} (every node must see the dataset at the driver's path: docs/recipes.md)")
    if isinstance(cause, StoreError):
        return StoreError(f"{message} (every node must see the store at the driver's path: docs/recipes.md)")
    return err  # a bug, not a setup problem: keep the worker's traceback


def where(job: RunJob) -> str:
    return f"zoo run {job.run} of location {job.location!r}"


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
