"""The strict card parser (``diffit.fitsheader``) agrees with astropy on every card it
accepts, refuses what it does not handle, and finds the data where astropy does."""
from __future__ import annotations

import gzip
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import example, given, settings
from hypothesis import strategies as st

from diffit.fitsheader import NotSimple, parse_card, parse_cards, read_header
from test_pair import image_hdu, wcs_header, write_hdu


def _astropy_value(card: str):
    parsed = fits.Card.fromstring(card.ljust(80))
    return parsed.keyword, parsed.value


def _same(ours, theirs) -> bool:
    if type(ours) is not type(theirs):
        return False
    if isinstance(ours, float):
        return ours == theirs or (math.isnan(ours) and math.isnan(theirs))
    return ours == theirs


KEYWORDS = st.sampled_from(["CRPIX1", "CRPIX2", "NAXIS1", "BSCALE", "CTYPE1", "DATE-OBS",
                            "A_B", "X", "CD1_1", "HISTORY", "COMMENT", "END", "crpix1",
                            "CONTINUE", "HIERARCH", "TWO WORD", ""])
NUMBERS = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: f"{v:.10E}"),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: f"{v:.15G}".replace("E", "D")),
    st.sampled_from(["1.", ".5", "+3", "-0", "007", "1e5", "1d-3", "1.5D+02", "-.25E1", "1E",
                     "1.2.3", "0x10", "nan", "inf", "1,5", "(1, 2)", "", "1 2", "T", "F",
                     "t", "TRUE"]),
)
STRINGS = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(
    lambda text: "'" + text.replace("'", "''") + "'")
VALUES = st.one_of(NUMBERS, STRINGS, st.sampled_from(["'unterminated", "'a' junk", "'a'/c"]))


@settings(max_examples=400, deadline=None)
@given(KEYWORDS, st.sampled_from(["= ", "=", " =", "  "]), st.integers(0, 20), VALUES,
       st.sampled_from(["", " / a comment", "/c", " junk"]))
@example("CRPIX1", "= ", 0, "'''/'", "")  # astropy reads "'", the standard "'/"
@example("OBJECT", "= ", 0, "'Barnard''s star'", " / name")
@example("OBSERVER", "= ", 1, "''", " / observer's name")
@example("CTYPE1", "= ", 2, "''", " / =' / c")  # astropy: "' / ="
def test_accepted_cards_read_as_astropy_reads_them(keyword, indicator, pad, value, comment) -> None:
    card = (keyword.ljust(8) + indicator + " " * pad + value + comment)[:80]
    try:
        ours = parse_card(card)
    except NotSimple:
        return  # astropy decides these
    if ours is not None and card[9:10] not in ("", " "):
        # "KEY     =value": off the standard, astropy does not read it; CFITSIO (so
        # Montage) reads the value, which is the one of the card with the blank added
        card = (card[:9] + " " + card[9:])[:80]
    theirs = _astropy_value(card)
    if ours is None:
        assert theirs[0] in ("", "COMMENT", "HISTORY")
        return
    assert ours[0] == theirs[0]
    assert _same(ours[1], theirs[1]), (card, ours, theirs)


@pytest.mark.parametrize("card, value", [
    ("CRPIX1  =                 10.5 / reference pixel", 10.5),
    ("NAXIS1  =                  512", 512),
    ("CDELT1  = -2.7777777777778D-04", -2.7777777777778e-04),
    ("CTYPE1  = 'RA---TAN'", "RA---TAN"),
    ("OBJECT  = 'it''s   '           / quotes doubled", "it's"),
    ("SIMPLE  =                    T", True),
    ("BSCALE  =                  1.0", 1.0),
    ("CD1_1   = .5", 0.5),
    ("CRPIX1  =67.5", 67.5),  # no blank after "=": CFITSIO reads the value
])
def test_standard_cards(card: str, value) -> None:
    keyword, parsed = parse_card(card)
    assert keyword == card[:8].strip() and _same(parsed, value)


@pytest.mark.parametrize("card", [
    "crpix1  = 1.5",                      # lower-case keyword (astropy normalises it)
    "CRPIX1  =",                          # undefined value
    "CRPIX1  = (1.0, 2.0)",               # complex
    "CRPIX1 = 1.5",                       # '=' not in column 9
    "CRPIX1    1.5",                      # no value indicator
    "HIERARCH ESO DET = 1",
    "CONTINUE  'more'",
    "COMMENT = 1",
    "CTYPE1  = 'RA---TAN",                # unterminated string
    "CRPIX1  = 1.5 2.5",
    "CRPIX1  = 1.5\t",                    # not printable ASCII
    "X" * 81,
])
def test_odd_cards_are_left_to_astropy(card: str) -> None:
    with pytest.raises(NotSimple):
        parse_card(card)


def test_first_occurrence_wins_as_in_astropy() -> None:
    cards = ["CRPIX1  = 1.5", "COMMENT hello", "CRPIX1  = 2.5", "", "HISTORY x"]
    header = fits.Header.fromstring("".join(c.ljust(80) for c in cards))
    assert parse_cards(cards) == {"CRPIX1": header["CRPIX1"]}


@pytest.mark.parametrize("fmt", ["f4", "f8", "i2", "i4", "u2", "cube-i2"])
@pytest.mark.parametrize("extra_cards", [0, 40, 200])
def test_read_header_matches_astropy_and_finds_the_data(tmp_path: Path, fmt: str, extra_cards: int) -> None:
    data = np.random.default_rng(3).normal(5, 2, (30, 40))
    hdu = image_hdu(data, wcs_header(3, 4), fmt)
    for k in range(extra_cards):
        hdu.header[f"EXTRA{k}"] = (k * 0.5, "padding the header over several blocks")
    path = write_hdu(hdu, tmp_path / "a.fits")
    with open(path, "rb") as stream:
        values, offset = read_header(stream)
    with fits.open(path) as hdul:
        header = hdul[0].header
        assert offset == hdul[0].fileinfo()["datLoc"]
        for key, value in values.items():
            assert _same(value, header[key]), key
        assert set(values) == {k for k in header if k not in ("SIMPLE", "COMMENT", "HISTORY", "")}


def test_read_header_refuses_what_it_does_not_handle(tmp_path: Path) -> None:
    path = write_hdu(image_hdu(np.ones((30, 40)), wcs_header(0, 0), "f4"), tmp_path / "a.fits")
    raw = path.read_bytes()
    cases = {
        "gzip": gzip.compress(raw),
        "extension first": raw.replace(b"SIMPLE  =", b"XTENSION=", 1),
        "no END": raw.replace(b"END" + b" " * 77, b" " * 80, 1)[:2880 * 2],
        "short": raw[:1000],
        "non-ASCII": raw.replace(b"CRPIX1  =", b"CRPIX\xe91 =", 1),
    }
    for name, content in cases.items():
        target = tmp_path / "case.fits"
        target.write_bytes(content)
        with open(target, "rb") as stream, pytest.raises(NotSimple):
            read_header(stream)
            pytest.fail(name)


def test_plain_images_are_read_without_importing_astropy(tmp_path: Path) -> None:
    path = write_hdu(image_hdu(np.arange(1200.0).reshape(30, 40), wcs_header(2, 3), "f4"),
                     tmp_path / "a.fits")
    code = (
        "import sys\n"
        "from diffit.fitsio import open_image, read_window\n"
        f"image = open_image({str(path)!r})\n"
        "window = read_window(image, slice(1, 3), slice(2, 5))\n"
        "assert window.tolist() == [[42.0, 43.0, 44.0], [82.0, 83.0, 84.0]], window\n"
        "assert 'astropy.io.fits' not in sys.modules\n"
        "print(image.geometry)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "crpix1=" in result.stdout
