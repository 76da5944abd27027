from __future__ import annotations

import pytest

import diffit


def test_dropin_matches_montagepy_on_a_small_survey(small_survey, tmp_path) -> None:
    montage = pytest.importorskip("MontagePy.main")
    for level_only in (False, True):
        (tmp_path / "m").mkdir(exist_ok=True)
        want = montage.mDiffFitExec(str(small_survey.projdir), str(small_survey.diffs),
                                    str(small_survey.template), str(tmp_path / "m"),
                                    str(tmp_path / "m.tbl"), levelOnly=level_only)
        got = diffit.mDiffFitExec(str(small_survey.projdir), str(small_survey.diffs),
                                  str(small_survey.template), str(tmp_path / "d"),
                                  str(tmp_path / "d.tbl"), levelOnly=level_only)
        assert got == want
        assert [type(v) for v in got.values()] == [type(v) for v in want.values()]
        assert (tmp_path / "d.tbl").read_text() == (tmp_path / "m.tbl").read_text()
        assert want["count"] - want["diff_failed"] - want["fit_failed"] >= 3


def test_signature_is_montagepys(small_survey, tmp_path) -> None:
    """Positional calls written for MontagePy bind the same parameters."""
    import inspect

    montage = pytest.importorskip("MontagePy.main")
    want = list(inspect.signature(montage.mDiffFitExec).parameters)
    got = inspect.signature(diffit.mDiffFitExec).parameters
    assert list(got)[:len(want)] == want
    assert all(got[name].kind is inspect.Parameter.KEYWORD_ONLY for name in list(got)[len(want):])
    result = diffit.mDiffFitExec(str(small_survey.projdir), str(small_survey.diffs),
                                 str(small_survey.template), str(tmp_path / "d"),
                                 str(tmp_path / "f.tbl"), 0, 0, 0, "", 0)
    assert result["status"] == "0" and result["count"] == small_survey.n_pairs
    refused = diffit.mDiffFitExec(str(small_survey.projdir), str(small_survey.diffs),
                                  str(small_survey.template), str(tmp_path / "d"),
                                  str(tmp_path / "g.tbl"), archive="my-bucket")
    assert refused["status"] == "1" and b"not supported" in refused["msg"]
    assert not (tmp_path / "g.tbl").exists()


def test_bytes_and_nul_file_names(small_survey, tmp_path) -> None:
    import os

    args = [os.fsencode(p) for p in (small_survey.projdir, small_survey.diffs, small_survey.template,
                                     tmp_path / "d", tmp_path / "f.tbl")]
    assert diffit.mDiffFitExec(*args)["status"] == "0"
    result = diffit.mDiffFitExec(str(small_survey.projdir), str(small_survey.diffs),
                                 str(small_survey.template), str(tmp_path / "d"), str(tmp_path / "t\0.tbl"))
    assert result["status"] == "1" and b"NUL" in result["msg"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_error_dict_has_montagepy_types(tmp_path) -> None:
    result = diffit.mDiffFitExec(str(tmp_path), str(tmp_path / "unknown.tbl"), "t.hdr",
                                 str(tmp_path), str(tmp_path / "fits.tbl"))
    assert result == {"status": "1",
                      "msg": f"Invalid diffs metadata file: {tmp_path / 'unknown.tbl'}".encode()}


def test_debug_prints_one_line_per_step(small_survey, tmp_path, capsys) -> None:
    diffit.mDiffFitExec(str(small_survey.projdir), str(small_survey.diffs),
                        str(small_survey.template), str(tmp_path), str(tmp_path / "f.tbl"),
                        debug=1, jobs=1)
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("mDiff(") for line in out) == small_survey.n_pairs
    assert any("Images don't overlap" in line for line in out)
    assert any(line.startswith("mFitplane(") and "OK" in line for line in out)


def test_modern_api_returns_outcomes(small_survey, tmp_path) -> None:
    result = diffit.run(small_survey.projdir, small_survey.diffs, small_survey.template,
                        tmp_path / "f.tbl", jobs=1, keep_outcomes=True)
    assert result.count == len(result.outcomes) == small_survey.n_pairs
    assert all(o.reason for o in result.failures)
    assert {o.stage for o in result.outcomes} <= {"ok", "diff", "fit"}


def test_unbuilt_kernels_give_an_install_hint() -> None:
    """A checkout whose extensions were never compiled fails with a hint, not a bare
    ImportError deep in the package."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'diffit._fitplane':\n"
        "            raise ImportError('No module named diffit._fitplane')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import diffit\n"
    )
    root = Path(diffit.__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "compiled kernels are missing" in last and "pip install ." in last
