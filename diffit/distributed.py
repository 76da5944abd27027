"""Run diffit's workers on a Dask cluster, through joblib's Dask backend.

:func:`dask_backend` connects a :class:`distributed.Client` and makes joblib dispatch
to it; the name it yields is passed on to :func:`diffit.run`::

    from diffit import run
    from diffit.distributed import dask_backend

    with dask_backend("tcp://scheduler:8786") as backend:
        run(projdir, "diffs.tbl", "template.hdr", "fits.tbl", backend=backend)

The workers need the same view of the file system as the client (``projdir``, and
``diffdir`` with ``keep_all``): tasks carry file names and pixel windows, not pixels.
Each worker process keeps its own cache of open images (``diffit.runner._READER``).

Two joblib 1.6 quirks are worked around by registering the backend under its own name,
:data:`BACKEND_NAME`, rather than using joblib's ``"dask"`` directly:

* ``joblib.Parallel(backend="dask")`` -- the backend *named* in ``Parallel`` rather than
  set by ``parallel_config`` -- passes ``nesting_level`` to the backend's constructor,
  which forwards it to ``Client.submit`` and on to the task: every task then fails with
  ``TypeError: Batch.__call__() got an unexpected keyword argument 'nesting_level'``.
* With ``n_jobs=-1`` and a cluster of a single worker thread, joblib sees one job and
  runs every task in the *client* process, which may not even see the images.
"""
from __future__ import annotations

import gc
import logging
import os
import re
from collections.abc import Iterator
from types import ModuleType
from contextlib import contextmanager

from diffit.runner import RunError, default_jobs

log = logging.getLogger(__name__)

#: The joblib backend name yielded by :func:`dask_backend`.
BACKEND_NAME = "diffit-dask"

INSTALL_HINT = "the dask backend needs: pip install 'diffit[dask]'"

_REGISTERED = False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _register() -> None:
    """Register :data:`BACKEND_NAME` with joblib (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import joblib
    from joblib._dask import DaskDistributedBackend

    class _DiffitDaskBackend(DaskDistributedBackend):
        """joblib's Dask backend, constructible by name and never run in the client."""

        def __init__(self, *args, nesting_level: int | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.nesting_level = nesting_level

        def effective_n_jobs(self, n_jobs: int) -> int:
            # joblib runs a "parallel" call with one job sequentially in this process
            return max(2, super().effective_n_jobs(n_jobs))

    joblib.register_parallel_backend(BACKEND_NAME, _DiffitDaskBackend)
    _REGISTERED = True


@contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Keep distributed's INFO chatter (cluster start/stop) out of diffit's log output."""
    logger = logging.getLogger("distributed")
    old = logger.level
    if not log.isEnabledFor(logging.DEBUG) and logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _local_cluster():
    from distributed import LocalCluster

    workers = default_jobs()
    log.info("starting a local Dask cluster of %d worker processes", workers)
    # the scheduler always serves HTTP (health, metrics); a random port avoids a clash,
    # and the warning that comes with it, when :8787 is taken
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address="127.0.0.1:0")


@contextmanager
def dask_backend(
    scheduler: str | os.PathLike | None,
    *,
    timeout: float = 5.0,
    wait_for_workers: float = 30.0,
) -> Iterator[str]:
    """Connect to a Dask scheduler and make joblib dispatch diffit's tasks to it.

    Parameters
    ----------
    scheduler : str or None
        Scheduler address, e.g. ``"tcp://host:8786"``, or the path of a scheduler file
        written by ``dask scheduler --scheduler-file``. ``None`` (or an empty string)
        starts a local cluster of one single-threaded worker process per core, for
        trying the backend out.
    timeout : float, optional
        Seconds allowed to connect to the scheduler.
    wait_for_workers : float, optional
        Seconds to wait for the cluster to have at least one worker.

    Yields
    ------
    str
        The joblib backend name to pass to :func:`diffit.run` as ``backend``.

    Raises
    ------
    RunError
        If dask/distributed is not installed, the scheduler cannot be reached, or the
        cluster has no worker.
    """
    try:
        import distributed
        import joblib
    except ImportError:
        raise RunError(INSTALL_HINT) from None
    address = os.fspath(scheduler).strip() if scheduler is not None else ""
    with _quiet_distributed():
        yield from _connected(distributed, joblib, address, timeout, wait_for_workers)


def _connected(distributed: ModuleType, joblib: ModuleType, address: str, timeout: float,
               wait_for_workers: float) -> Iterator[str]:
    """The body of :func:`dask_backend`: connect, wait for a worker, yield, close."""
    cluster = None
    try:
        if address:
            where = f"the Dask scheduler at {address}"
            kind = "scheduler_file" if os.path.isfile(address) else "address"
            if kind == "address" and not _ADDRESS.match(address):
                raise ValueError("not a scheduler address (tcp://host:port) or scheduler file")
            client = distributed.Client(**{kind: address}, timeout=timeout)
        else:
            where = "a local Dask cluster"
            cluster = _local_cluster()
            client = distributed.Client(cluster, timeout=timeout)
    except Exception as error:
        if cluster is not None:
            cluster.close()
        message = _one_line(error)
        del error
        # A half-built Client is closed by its __del__; collect it now, not during the
        # start of some later Client, where distributed can deadlock on its loop lock.
        gc.collect()
        raise RunError(f"cannot connect to {where}: {message}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=wait_for_workers)
        except Exception:
            raise RunError(f"{where} has no worker after "
                           f"{wait_for_workers:g} s") from None
        log.info("dispatching to Dask at %s (%d worker threads)", client.scheduler.address,
                 sum(client.nthreads().values()))
        _register()
        with joblib.parallel_config(backend=BACKEND_NAME):
            yield BACKEND_NAME
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


_ADDRESS = re.compile(r"^(?:(?:tcp|tls|inproc|ucx|ws|wss)://)?[^\s/:]+:\d+$|^(?:inproc|ucx)://\S+$")

__all__ = ["dask_backend", "BACKEND_NAME"]
