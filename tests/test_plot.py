"""The QA picture: a real PNG of a generated survey's fits.tbl, and its error messages."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from diffit.cli import main  # noqa: E402
from diffit.datasets import make_survey, write_overlap_table  # noqa: E402
from diffit.plot import INSTALL_HINT, flag_outliers, plot_fits, robust_z  # noqa: E402
from diffit.runner import RunError, run  # noqa: E402
from diffit.tables import FITS_TBL_HEADER  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A survey, its fits.tbl, and an overlap table with one extra, failing, pair."""
    survey = make_survey(tmp_path_factory.mktemp("plot") / "survey", n_tiles=12,
                         tile_shape=(64, 48), seed=7)
    tiles = list(survey.tiles)
    pairs = [tuple(int(v) for v in line.split()[:2])
             for line in survey.diffs_table.read_text().splitlines()[2:]]
    far = next((0, k) for k in range(len(tiles)) if k and (0, k) not in pairs)
    diffs = write_overlap_table(survey.directory / "diffs_plus_one.tbl", tiles, sorted(pairs + [far]))
    output = survey.directory / "fits.tbl"
    result = run(survey.projdir, diffs, survey.template, output, jobs=1)
    assert result.diff_failed == 1 and result.count == survey.n_pairs + 1
    return survey, diffs, output


def _check_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    height, width = image.shape[:2]
    assert width > 800 and height > 500
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not blank
    colours = np.unique((rgb.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colours) > 50  # a colour map, not a few flat fills
    return image


def test_plot_fits_png(fitted, tmp_path):
    survey, diffs, output = fitted
    png = plot_fits(output, projdir=survey.projdir, diffs=diffs, output=tmp_path / "qa.png")
    assert png == tmp_path / "qa.png"
    _check_png(png)


def test_plot_flags_outliers(fitted, tmp_path):
    """A fits.tbl with a doctored row: the picture still renders, the row is flagged."""
    survey, diffs, output = fitted
    lines = output.read_text().splitlines(keepends=True)
    fields = lines[1].split()
    fields[13], fields[14] = "3", "9.00000e+01"  # npixel, rms
    lines[1] = " " + " ".join(fields) + " \n"
    doctored = tmp_path / "fits.tbl"
    doctored.write_text("".join(lines))
    _check_png(plot_fits(doctored, projdir=survey.projdir, diffs=diffs, output=tmp_path / "qa.png"))


def test_cli_plot(fitted, tmp_path, capsys):
    survey, diffs, output = fitted
    png = tmp_path / "cli.png"
    code = main(["plot", str(output), "--projdir", str(survey.projdir), "--diffs", str(diffs),
                 "-o", str(png)])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    _check_png(png)


def test_cli_plot_missing_image(fitted, tmp_path, capsys):
    survey, diffs, output = fitted
    projdir = tmp_path / "projected"
    shutil.copytree(survey.projdir, projdir)
    missing = projdir / survey.tiles[3].name
    missing.unlink()
    code = main(["plot", str(output), "--projdir", str(projdir), "--diffs", str(diffs),
                 "-o", str(tmp_path / "qa.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines() == [
        f"diffit: error: cannot plot: image {missing} not found (check --projdir)"]
    assert not (tmp_path / "qa.png").exists()


@pytest.mark.parametrize("content", ["not a table\n", FITS_TBL_HEADER + " 1 2 3\n"])
def test_bad_fits_table(fitted, tmp_path, content):
    survey, diffs, _ = fitted
    bad = tmp_path / "fits.tbl"
    bad.write_text(content)
    with pytest.raises(RunError, match=r"^cannot plot: (Invalid fits table|Malformed row)"):
        plot_fits(bad, projdir=survey.projdir, diffs=diffs, output=tmp_path / "qa.png")


def test_missing_fits_table(fitted, tmp_path):
    survey, diffs, _ = fitted
    with pytest.raises(RunError, match="^cannot plot: Invalid fits table"):
        plot_fits(tmp_path / "nope.tbl", projdir=survey.projdir, diffs=diffs)


def test_mismatched_tables(fitted, tmp_path):
    survey, diffs, output = fitted
    first_pair = diffs.read_text().splitlines()[:3]
    short = tmp_path / "diffs.tbl"
    short.write_text("\n".join(first_pair) + "\n")
    with pytest.raises(RunError, match="refers to image cntr"):
        plot_fits(output, projdir=survey.projdir, diffs=short, output=tmp_path / "qa.png")


def test_missing_matplotlib(fitted, tmp_path, monkeypatch):
    survey, diffs, output = fitted
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(RunError, match=r"^the plot command needs: pip install 'diffit\[plot\]'$"):
        plot_fits(output, projdir=survey.projdir, diffs=diffs, output=tmp_path / "qa.png")
    assert INSTALL_HINT == "the plot command needs: pip install 'diffit[plot]'"


def test_flag_outliers():
    rng = np.random.default_rng(0)
    rms = rng.normal(1.0, 0.05, 200)
    npixel = rng.integers(2000, 4000, 200)
    rms[7], npixel[11], npixel[12] = 5.0, 10, 0
    rms[20] = np.nan
    flags = flag_outliers(rms, npixel)
    assert set(np.flatnonzero(flags["rms"])) == {7, 20}
    assert set(np.flatnonzero(flags["tiny"])) == {11, 12}
    assert {11, 12} <= set(np.flatnonzero(flags["npixel"]))
    assert set(np.flatnonzero(flags["any"])) == {7, 11, 12, 20}


def test_robust_z_constant_sample():
    z = robust_z(np.array([2.0, 2.0, 2.0, 2.0, 3.0]))
    assert z.tolist() == [0.0, 0.0, 0.0, 0.0, np.inf]
