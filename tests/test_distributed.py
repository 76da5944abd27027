"""The Dask backend: same fits.tbl through a real (local, multi-process) Dask cluster."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

import diffit.runner  # noqa: E402
from diffit.cli import main  # noqa: E402
from diffit.datasets import make_survey  # noqa: E402
from diffit.distributed import BACKEND_NAME, INSTALL_HINT, dask_backend  # noqa: E402
from diffit.runner import RunError, run  # noqa: E402

# Closing a LocalCluster can leave a worker's comm half-closed; distributed then emits
# ResourceWarning/RuntimeWarning from its event loop thread at shutdown. They say nothing
# about diffit, and pyproject turns warnings into errors, so they are ignored here only.
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


def _counters(result: diffit.runner.RunResult) -> tuple[int, int, int, int]:
    return result.count, result.diff_failed, result.fit_failed, result.warning


def _has_reader() -> bool:
    return diffit.runner._READER is not None


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    return make_survey(tmp_path_factory.mktemp("dask") / "survey", n_tiles=8,
                       tile_shape=(64, 48), seed=5)


@pytest.fixture(scope="module")
def reference(survey):
    """fits.tbl and counters of a plain in-process run."""
    output = survey.directory / "fits_local.tbl"
    result = run(survey.projdir, survey.diffs_table, survey.template, output, jobs=1)
    assert result.count == survey.n_pairs > 10
    assert result.succeeded == result.count
    return output.read_bytes(), _counters(result)


def _cluster(n_workers: int):
    # an explicit random port for the scheduler's HTTP server: with the default
    # (:8787) a second cluster on the machine makes distributed warn "port in use"
    return distributed.LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1,
                                    host="127.0.0.1", dashboard_address="127.0.0.1:0")


@pytest.fixture(scope="module")
def cluster():
    with _cluster(2) as cluster:
        yield cluster


def test_dask_run_matches_local_run(survey, reference, cluster, monkeypatch):
    monkeypatch.setattr(diffit.runner, "_READER", None)
    output = survey.directory / "fits_dask.tbl"
    with dask_backend(cluster.scheduler_address) as backend:
        assert backend == BACKEND_NAME
        result = run(survey.projdir, survey.diffs_table, survey.template, output,
                     backend=backend, batch_size=2)
        with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
            ran_on = client.run(_has_reader)
    assert output.read_bytes() == reference[0]
    assert _counters(result) == reference[1]
    assert any(ran_on.values())  # the pairs were processed by the workers ...
    assert diffit.runner._READER is None  # ... and not in this process


def test_cli_dask_backend(survey, reference, cluster, capsys):
    output = survey.directory / "fits_cli.tbl"
    code = main(["run", "--projdir", str(survey.projdir), "--diffs", str(survey.diffs_table),
                 "--template", str(survey.template), "--output", str(output),
                 "--backend", "dask", "--scheduler", cluster.scheduler_address, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert output.read_bytes() == reference[0]
    assert out.startswith(f"{survey.n_pairs} pairs: {survey.n_pairs} fitted, 0 diff failed")


def test_single_worker_cluster_still_dispatches(survey, reference, monkeypatch):
    """joblib runs a one-job Parallel in the caller's process; the backend must not."""
    monkeypatch.setattr(diffit.runner, "_READER", None)
    output = survey.directory / "fits_one.tbl"
    with _cluster(1) as cluster, dask_backend(cluster.scheduler_address) as backend:
        result = run(survey.projdir, survey.diffs_table, survey.template, output, backend=backend)
    assert output.read_bytes() == reference[0]
    assert _counters(result) == reference[1]
    assert diffit.runner._READER is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_scheduler(survey, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    code = main(["run", "--projdir", str(survey.projdir), "--diffs", str(survey.diffs_table),
                 "--template", str(survey.template), "--output", str(tmp_path / "fits.tbl"),
                 "--backend", "dask", "--scheduler", address, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"diffit: error: cannot connect to the Dask scheduler at {address}")
    assert "Traceback" not in err
    assert not (tmp_path / "fits.tbl").exists()


@pytest.mark.parametrize("address", ["nonsense", "foo://host:8786"])
def test_malformed_address(address):
    with pytest.raises(RunError, match=f"^cannot connect to the Dask scheduler at {address}: "):
        with dask_backend(address):
            pass  # pragma: no cover


def test_missing_dask(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(RunError, match=r"^the dask backend needs: pip install 'diffit\[dask\]'$"):
        with dask_backend("tcp://127.0.0.1:8786"):
            pass  # pragma: no cover
    assert INSTALL_HINT == "the dask backend needs: pip install 'diffit[dask]'"


def test_scheduler_file(survey, reference, cluster, tmp_path: Path):
    """A path to a scheduler file (dask scheduler --scheduler-file) is accepted too."""
    import json

    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": cluster.scheduler_address}))
    output = tmp_path / "fits.tbl"
    with dask_backend(scheduler_file) as backend:
        run(survey.projdir, survey.diffs_table, survey.template, output, backend=backend)
    assert output.read_bytes() == reference[0]
