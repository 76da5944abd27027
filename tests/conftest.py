"""Shared fixtures: small generated FITS inputs on a common template grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

TEMPLATE_CARDS = """SIMPLE  = T
BITPIX  = -64
NAXIS   = 2
NAXIS1  = {naxis1}
NAXIS2  = {naxis2}
CTYPE1  = 'RA---TAN'
CTYPE2  = 'DEC--TAN'
EQUINOX = 2000.0
CRVAL1  = 270.0
CRVAL2  = -16.0
CRPIX1  = {crpix1}
CRPIX2  = {crpix2}
CDELT1  = -0.0005
CDELT2  = 0.0005
CROTA2  = 0.0
END
"""


def write_template(path: Path, naxis1: int, naxis2: int, crpix1: float, crpix2: float) -> Path:
    """Write a Montage text header template."""
    path.write_text(TEMPLATE_CARDS.format(naxis1=naxis1, naxis2=naxis2, crpix1=crpix1, crpix2=crpix2))
    return path


def image_header(crpix1: float, crpix2: float) -> fits.Header:
    """A projected image's header on the template grid above."""
    header = fits.Header()
    header["CTYPE1"] = "RA---TAN"
    header["CTYPE2"] = "DEC--TAN"
    header["CRVAL1"] = 270.0
    header["CRVAL2"] = -16.0
    header["CRPIX1"] = crpix1
    header["CRPIX2"] = crpix2
    header["CDELT1"] = -0.0005
    header["CDELT2"] = 0.0005
    return header


class SmallSurvey:
    """A handful of noisy overlapping images on a 200x180 template with fractional CRPIX."""

    def __init__(self, root: Path, n_images: int = 5, seed: int = 3, areas: bool = True) -> None:
        from diffit.tables import format_overlap_table

        rng = np.random.default_rng(seed)
        self.root = root
        self.projdir = root / "projected"
        self.projdir.mkdir(parents=True)
        self.template = write_template(root / "template.hdr", 200, 180, 100.5, 90.25)
        names = []
        boxes = []
        for k in range(n_images):
            nx, ny = (int(v) for v in rng.integers(50, 90, 2))
            ox, oy = int(rng.integers(-5, 200 - nx + 5)), int(rng.integers(-5, 180 - ny + 5))
            yy, xx = np.mgrid[0:ny, 0:nx]
            data = (rng.normal(0.0, 0.2, (ny, nx)) + rng.uniform(-4, 4)
                    + 0.004 * (xx + ox) - 0.003 * (yy + oy))
            data[rng.random((ny, nx)) < 0.01] += 30.0
            data[rng.random((ny, nx)) < 0.01] = np.nan
            header = image_header(100.5 - ox, 90.25 - oy)
            name = f"img{k:02d}.fits"
            fits.writeto(self.projdir / name, data.astype(np.float32), header)
            if areas:
                area = np.full((ny, nx), rng.uniform(0.9, 1.1))
                area[:, :2] = 0.4
                fits.writeto(self.projdir / f"img{k:02d}_area.fits", area, header)
            names.append(name)
            boxes.append((ox, oy, nx, ny))
        rows = []
        for a in range(n_images):
            for b in range(a + 1, n_images):
                rows.append((a, b, names[a], names[b], f"diff.{a:06d}.{b:06d}.fits"))
        self.n_pairs = len(rows)
        self.diffs = root / "diffs.tbl"
        self.diffs.write_text(format_overlap_table(rows))


@pytest.fixture
def small_survey(tmp_path: Path) -> SmallSurvey:
    """Five noisy images with area files, every pair listed (some do not overlap)."""
    return SmallSurvey(tmp_path / "survey")
