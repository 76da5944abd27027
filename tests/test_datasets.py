"""Tests of diffit.datasets: synthetic projected surveys that Montage accepts."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit.datasets import (
    Survey,
    Tile,
    find_overlaps,
    injected_planes,
    make_survey,
    make_template_header,
    write_images_table,
    write_overlap_table,
    write_template,
)


def brute_overlaps(tiles):
    """Reference: every pair sharing at least one pixel, k < l, in mOverlaps order."""
    out = []
    for k, a in enumerate(tiles):
        for l in range(k + 1, len(tiles)):
            b = tiles[l]
            if min(a.nx, a.ny, b.nx, b.ny) <= 0:
                continue
            if a.x0 < b.x0 + b.nx and b.x0 < a.x0 + a.nx and a.y0 < b.y0 + b.ny and b.y0 < a.y0 + a.ny:
                out.append((k, l))
    return out


def read_header_text(path: Path) -> dict[str, str]:
    """Montage's template parser: keyword = first token, value up to space or quote."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.ljust(80)
        key = line.split()[0] if line.strip() else ""
        if "=" in line:
            values[key] = line.split("=", 1)[1].strip().strip("'").split()[0].strip("'")
    return values


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Survey:
    """6 tiles of 48x64 with wide (25 %) overlaps: every feature on."""
    return make_survey(tmp_path_factory.mktemp("survey"), n_tiles=6, tile_shape=(64, 48), overlap=0.25)


# ------------------------------------------------------------------------------------
# Template
# ------------------------------------------------------------------------------------
def test_template_header_cards() -> None:
    hdr = make_template_header(300, 200, 150.5, 100.5)
    assert list(hdr)[:5] == ["SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2"]
    assert (hdr["NAXIS1"], hdr["NAXIS2"], hdr["CRPIX1"], hdr["CRPIX2"]) == (300, 200, 150.5, 100.5)
    assert (hdr["CTYPE1"], hdr["CTYPE2"]) == ("RA---TAN", "DEC--TAN")
    assert hdr["CDELT1"] == pytest.approx(-1 / 3600) and hdr["CDELT2"] == pytest.approx(1 / 3600)
    assert (hdr["CRVAL1"], hdr["CRVAL2"], hdr["EQUINOX"]) == (270.0, -16.2, 2000)
    gal = make_template_header(10, 10, 5.5, 5.5, crval1=10.0, crval2=0.0, cdelt=1e-3, ctype=("GLON-CAR", "GLAT-CAR"))
    assert "EQUINOX" not in gal and gal["CTYPE1"] == "GLON-CAR" and gal["CDELT2"] == 1e-3
    with pytest.raises(ValueError):
        make_template_header(10, 10, 5.5, 5.5, ctype=("RA---TAN", "DEC--SIN"))
    with pytest.raises(ValueError):
        make_template_header(0, 10, 5.5, 5.5)


def test_write_template_is_a_montage_text_header(tmp_path: Path) -> None:
    hdr = make_template_header(1234, 987, 617.5, 494.5)
    path = write_template(hdr, tmp_path / "t.hdr")
    lines = path.read_text().splitlines()
    assert lines[-1] == "END"
    assert all(len(line) <= 80 for line in lines)
    assert all(line == line.rstrip() for line in lines)
    assert len(lines) == len(hdr) + 1
    back = fits.Header.fromtextfile(str(path))
    for key in hdr:  # astropy writes at most 20 characters of a float
        if isinstance(hdr[key], float):
            assert back[key] == pytest.approx(hdr[key], rel=1e-13), key
        else:
            assert back[key] == hdr[key], key
    # what mDiff's own parser reads (atoi/atof of the first token after '=')
    values = read_header_text(path)
    assert int(values["NAXIS1"]) == 1234 and float(values["CRPIX2"]) == 494.5


# ------------------------------------------------------------------------------------
# Overlaps
# ------------------------------------------------------------------------------------
tile_strategy = st.builds(
    Tile,
    name=st.just("t.fits"),
    x0=st.integers(-40, 40),
    y0=st.integers(-40, 40),
    nx=st.integers(0, 30),
    ny=st.integers(0, 30),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(tile_strategy, max_size=25))
def test_find_overlaps_matches_brute_force(tiles) -> None:
    assert find_overlaps(tiles) == brute_overlaps(tiles)


def test_find_overlaps_edges() -> None:
    base = Tile("a.fits", 10, 10, 20, 30)
    tiles = [
        base,
        Tile("right_touch.fits", 30, 10, 5, 5),  # touches the right edge: no shared pixel
        Tile("right_1px.fits", 29, 39, 1, 1),  # shares exactly pixel (29, 39)
        Tile("corner_touch.fits", 30, 40, 5, 5),  # touches the top-right corner only
        Tile("below_touch.fits", 10, 5, 20, 5),  # touches the bottom edge
        Tile("inside.fits", 15, 15, 2, 2),  # inside base
        Tile("far.fits", 1000, 1000, 20, 30),
        Tile("empty.fits", 15, 15, 0, 5),  # no pixels at all
    ]
    assert find_overlaps(tiles) == [(0, 2), (0, 5)]
    assert find_overlaps([]) == [] and find_overlaps([base]) == []


def test_find_overlaps_large_and_fast() -> None:
    rng = np.random.default_rng(5)
    n = 10_000
    side = int(math.sqrt(n))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    x0 = gx.ravel() * 460 + rng.integers(-5, 6, n)
    y0 = gy.ravel() * 920 + rng.integers(-5, 6, n)
    tiles = [Tile(f"t{k}.fits", int(x0[k]), int(y0[k]), 512, 1024) for k in range(n)]
    t0 = time.perf_counter()
    pairs = find_overlaps(tiles)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # typically ~0.1 s
    # grid with row/column overlaps + diagonals: 2*side*(side-1) + 2*(side-1)**2 pairs
    assert len(pairs) == 2 * side * (side - 1) + 2 * (side - 1) ** 2
    assert pairs == sorted(pairs) and all(k < l for k, l in pairs)
    # spot-check against brute force on a random subset
    sub = sorted(rng.choice(n, 300, replace=False).tolist())
    chosen = set(sub)
    expected = [(sub[k], sub[l]) for k, l in brute_overlaps([tiles[k] for k in sub])]
    assert expected == [p for p in pairs if p[0] in chosen and p[1] in chosen]


# ------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------
def test_write_overlap_table_layout(tmp_path: Path) -> None:
    tiles = [Tile("a.fits", 0, 0, 10, 10), Tile("longer_name.fits", 5, 5, 10, 10), Tile("c.fits", 8, 0, 10, 10)]
    pairs = find_overlaps(tiles)
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    path = write_overlap_table(tmp_path / "diffs.tbl", tiles, pairs)
    text = path.read_text()
    assert text == (
        "| cntr1 | cntr2 |            plus |           minus |         diff             |\n"
        "| int   | int   |            char |            char |         char             |\n"
        "       0       1           a.fits  longer_name.fits  diff.000000.000001.fits\n"
        "       0       2           a.fits            c.fits  diff.000000.000002.fits\n"
        "       1       2 longer_name.fits            c.fits  diff.000001.000002.fits\n"
    )
    # Montage's mtbl reads fields between the '|' positions of the header line and
    # drops the character under each '|': those must be blanks in the data rows
    lines = text.splitlines()
    bars = [i for i, ch in enumerate(lines[0]) if ch == "|"]
    for row in lines[2:]:
        assert all(row[i] == " " for i in bars if i < len(row))
    table = Table.read(path, format="ascii.ipac")
    assert table.colnames == ["cntr1", "cntr2", "plus", "minus", "diff"]
    assert list(table["minus"]) == ["longer_name.fits", "c.fits", "c.fits"]
    assert list(table["diff"])[2] == "diff.000001.000002.fits"


def test_write_overlap_table_empty(tmp_path: Path) -> None:
    path = write_overlap_table(tmp_path / "d.tbl", [Tile("x.fits", 0, 0, 5, 5)], [])
    assert path.read_text().splitlines()[0] == "| cntr1 | cntr2 |  plus | minus |         diff             |"
    assert len(path.read_text().splitlines()) == 2


def test_write_images_table(tmp_path: Path) -> None:
    tiles = [Tile("a.fits", 0, 0, 10, 20), Tile("b.fits", 7, 3, 10, 20)]
    hdr = make_template_header(17, 23, 9.5, 12.5)
    path = write_images_table(tmp_path / "images.tbl", tiles, header=hdr, extra={"bgc": [1.5, -2.0]})
    table = Table.read(path, format="ascii.ipac")
    for col in ("cntr", "ra", "dec", "naxis1", "naxis2", "ctype1", "crval1", "crpix1", "crpix2", "cdelt1", "fname"):
        assert col in table.colnames
    assert list(table["cntr"]) == [0, 1]
    assert list(table["crpix1"]) == [9.5, 2.5] and list(table["crpix2"]) == [12.5, 9.5]
    assert list(table["naxis1"]) == [10, 10] and list(table["fname"]) == ["a.fits", "b.fits"]
    assert list(table["bgc"]) == [1.5, -2.0]
    # tile 0's centre is left of the reference pixel, tile 1's right of it; RA grows leftwards
    assert table["ra"][0] > 270.0 > table["ra"][1]
    assert table["dec"][0] < -16.2 < table["dec"][1]
    bare = Table.read(write_images_table(tmp_path / "bare.tbl", tiles), format="ascii.ipac")
    assert list(bare["crpix1"]) == [1.0, -6.0]
    with pytest.raises(ValueError):
        write_images_table(tmp_path / "bad.tbl", tiles, extra={"x": [1]})


# ------------------------------------------------------------------------------------
# make_survey
# ------------------------------------------------------------------------------------
def test_survey_files_and_headers(survey: Survey) -> None:
    assert survey.projdir == survey.directory / "projected"
    assert len(survey.tiles) == 6
    template = fits.Header.fromtextfile(str(survey.template))
    tn1, tn2 = template["NAXIS1"], template["NAXIS2"]
    tc1, tc2 = template["CRPIX1"], template["CRPIX2"]
    assert tc1 % 1 == 0.5 and tc2 % 1 == 0.5  # fractional, half-integer
    assert min(t.x0 for t in survey.tiles) == 0 and max(t.x0 + t.nx for t in survey.tiles) == tn1
    assert min(t.y0 for t in survey.tiles) == 0 and max(t.y0 + t.ny for t in survey.tiles) == tn2
    n_blank = 0
    for tile in survey.tiles:
        with fits.open(survey.projdir / tile.name) as hdul:
            hdul.verify("exception")
            hdr, data = hdul[0].header, hdul[0].data
        assert data.shape == (tile.ny, tile.nx) and hdr["BITPIX"] == -32
        assert (hdr["NAXIS1"], hdr["NAXIS2"]) == (tile.nx, tile.ny)
        assert hdr["CRPIX1"] == tc1 - tile.x0 and hdr["CRPIX2"] == tc2 - tile.y0
        assert int(tc1 - hdr["CRPIX1"]) == tile.x0 and int(tc2 - hdr["CRPIX2"]) == tile.y0  # mDiff's (int)
        for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2"):
            assert hdr[key] == template[key]
        with fits.open(survey.projdir / tile.name.replace(".fits", "_area.fits")) as hdul:
            hdul.verify("exception")
            area = hdul[0].data
            assert (hdul[0].header["CRPIX1"], hdul[0].header["CRPIX2"]) == (hdr["CRPIX1"], hdr["CRPIX2"])
        blank = np.isnan(data)
        n_blank += blank.sum()
        assert np.all(area[blank] == 0.0) and np.all(area[~blank] > 0.0)
        assert area.max() < 1.01 and np.median(area[~blank]) == pytest.approx(1.0, abs=0.01)
        assert np.isfinite(data[~blank]).all()
    assert n_blank > 0  # some tiles have blank corners / columns / rows
    diffs = Table.read(survey.diffs_table, format="ascii.ipac")
    assert len(diffs) == survey.n_pairs == len(find_overlaps(survey.tiles))
    images = Table.read(survey.images_table, format="ascii.ipac")
    assert list(images["fname"]) == [t.name for t in survey.tiles]


def test_injected_planes(survey: Survey) -> None:
    planes = injected_planes(survey)
    assert planes.shape == (6, 3)
    for k, tile in enumerate(survey.tiles):
        hdr = fits.getheader(survey.projdir / tile.name)
        assert planes[k] == pytest.approx([hdr["BGA"], hdr["BGB"], hdr["BGC"]], rel=1e-14)


def test_shared_sky_and_planes(tmp_path: Path) -> None:
    """Noise-free tiles agree on the shared sky: overlaps differ by the plane difference."""
    s = make_survey(tmp_path, n_tiles=5, tile_shape=(60, 40), overlap=0.2, noise=0.0, sky="nebula",
                    nan_masks=False, areas=False, dtype="float64", seed=3)
    assert not list(s.projdir.glob("*_area.fits"))
    template = fits.Header.fromtextfile(str(s.template))
    tc1, tc2 = template["CRPIX1"], template["CRPIX2"]
    planes = injected_planes(s)
    data = [fits.getdata(s.projdir / t.name) for t in s.tiles]
    assert data[0].dtype.itemsize == 8
    assert s.n_pairs >= 4
    for k, l in find_overlaps(s.tiles):
        a, b = s.tiles[k], s.tiles[l]
        i0, i1 = max(a.x0, b.x0), min(a.x0 + a.nx, b.x0 + b.nx)
        j0, j1 = max(a.y0, b.y0), min(a.y0 + a.ny, b.y0 + b.ny)
        diff = (data[k][j0 - a.y0 : j1 - a.y0, i0 - a.x0 : i1 - a.x0]
                - data[l][j0 - b.y0 : j1 - b.y0, i0 - b.x0 : i1 - b.x0])
        x = np.arange(i0, i1) - tc1  # Montage: x = i - CRPIX (0-based template column i)
        y = np.arange(j0, j1) - tc2
        da, db, dc = planes[k] - planes[l]
        expected = da * x[None, :] + db * y[:, None] + dc
        np.testing.assert_allclose(diff, expected, atol=1e-9)


def test_survey_is_deterministic(tmp_path: Path) -> None:
    kw = dict(n_tiles=4, tile_shape=(40, 32), seed=7)
    a = make_survey(tmp_path / "a", **kw, n_jobs=1)
    b = make_survey(tmp_path / "b", **kw, n_jobs=3)
    c = make_survey(tmp_path / "c", **{**kw, "seed": 8})
    names = sorted(p.name for p in a.projdir.iterdir())
    assert len(names) == 8 and names == sorted(p.name for p in b.projdir.iterdir())
    for name in names:
        assert (a.projdir / name).read_bytes() == (b.projdir / name).read_bytes()
    for attr in ("template", "images_table", "diffs_table"):
        assert getattr(a, attr).read_bytes() == getattr(b, attr).read_bytes()
    assert a.tiles == b.tiles
    assert (a.projdir / names[0]).read_bytes() != (c.projdir / names[0]).read_bytes()


def test_survey_layout_like_2mass(tmp_path: Path) -> None:
    """400 tall tiles (2:1, as 2MASS' 512x1024) give ~1,100-1,200 pairs; all connected."""
    s = make_survey(tmp_path, n_tiles=400, tile_shape=(64, 32), sky="none", noise=0.0,
                    areas=False, nan_masks=False)
    assert 1000 <= s.n_pairs <= 1500
    pairs = find_overlaps(s.tiles)
    degree = np.bincount(np.array(pairs).ravel(), minlength=400)
    assert degree.min() >= 2 and np.median(degree) >= 5
    # no edge-touching tiles (mOverlaps would list them; mDiff would then fail them)
    x0 = np.array([t.x0 for t in s.tiles]); y0 = np.array([t.y0 for t in s.tiles])
    grown = [Tile(t.name, t.x0 - 1, t.y0 - 1, t.nx + 2, t.ny + 2) for t in s.tiles]
    assert find_overlaps(grown) == pairs
    assert x0.min() == 0 and y0.min() == 0


def test_make_survey_rejects_bad_arguments(tmp_path: Path) -> None:
    for kw in (dict(n_tiles=0), dict(overlap=0.0), dict(overlap=0.6), dict(noise=-1.0),
               dict(dtype="int16"), dict(dtype="float16"), dict(sky="stars+galaxies"),
               dict(tile_shape=(2, 50)), dict(seed=-1)):
        with pytest.raises(ValueError):
            make_survey(tmp_path, **kw)


# ------------------------------------------------------------------------------------
# Montage accepts it
# ------------------------------------------------------------------------------------
def test_montagepy_difffitexec_accepts_survey(survey: Survey, tmp_path: Path) -> None:
    montage = pytest.importorskip("MontagePy.main")
    (tmp_path / "diffs").mkdir()
    fitfile = tmp_path / "fits.tbl"
    result = montage.mDiffFitExec(str(survey.projdir), str(survey.diffs_table), str(survey.template),
                                  str(tmp_path / "diffs"), str(fitfile))
    assert result["status"] == "0", result
    assert (result["count"], result["diff_failed"], result["fit_failed"]) == (survey.n_pairs, 0, 0)
    fits_tbl = Table.read(fitfile, format="ascii.ipac")
    assert len(fits_tbl) == survey.n_pairs
    planes = injected_planes(survey)
    truth = np.array([planes[k] - planes[l] for k, l in zip(fits_tbl["plus"], fits_tbl["minus"])])
    c_err = fits_tbl["c"] - truth[:, 2]
    # c is the plane at the template CRPIX (x = i - CRPIX): extrapolated from the
    # overlap, so slope errors leak in; injected level differences spread ~7 DN
    assert np.all(np.abs(c_err) < 2.0), c_err
    assert np.median(np.abs(c_err)) < 0.75
    assert np.corrcoef(fits_tbl["c"], truth[:, 2])[0, 1] > 0.97
    # at the centre of the fitted pixels the plane is pinned down by the data
    xc, yc = fits_tbl["xcenter"], fits_tbl["ycenter"]
    at_centre = fits_tbl["a"] * xc + fits_tbl["b"] * yc + fits_tbl["c"]
    assert np.all(np.abs(at_centre - (truth[:, 0] * xc + truth[:, 1] * yc + truth[:, 2])) < 0.5)
    assert np.all(fits_tbl["rms"] < 2.0)  # noise 1 per tile: sqrt(2) before clipping


def test_montagepy_difffitexec_without_areas(tmp_path: Path) -> None:
    montage = pytest.importorskip("MontagePy.main")
    s = make_survey(tmp_path / "s", n_tiles=4, tile_shape=(48, 40), overlap=0.25, areas=False, seed=2)
    (tmp_path / "diffs").mkdir()
    result = montage.mDiffFitExec(str(s.projdir), str(s.diffs_table), str(s.template),
                                  str(tmp_path / "diffs"), str(tmp_path / "fits.tbl"), noAreas=True)
    assert result == {"status": "0", "count": s.n_pairs, "diff_failed": 0, "fit_failed": 0, "warning": 0}


def test_montagepy_overlaps_agree(survey: Survey, tmp_path: Path) -> None:
    montage = pytest.importorskip("MontagePy.main")
    # mOverlaps reads our images.tbl and writes exactly our diffs.tbl
    ours = tmp_path / "from_our_images.tbl"
    assert montage.mOverlaps(str(survey.images_table), str(ours))["status"] == "0"
    assert ours.read_text() == survey.diffs_table.read_text()
    # mImgtbl + mOverlaps (directory order, absolute names): the same pairs
    imgtbl = tmp_path / "images.tbl"
    result = montage.mImgtbl(str(survey.projdir), str(imgtbl))
    assert result["status"] == "0" and result["count"] == len(survey.tiles)
    diffs = tmp_path / "diffs.tbl"
    assert montage.mOverlaps(str(imgtbl), str(diffs))["status"] == "0"
    table = Table.read(diffs, format="ascii.ipac")
    theirs = {frozenset((Path(p).name, Path(m).name)) for p, m in zip(table["plus"], table["minus"])}
    mine = {frozenset((survey.tiles[k].name, survey.tiles[l].name)) for k, l in find_overlaps(survey.tiles)}
    assert theirs == mine
