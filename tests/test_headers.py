"""Template parsing and validation, and the image-on-the-template-grid check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffit.headers import (
    TemplateError,
    c_atof,
    c_atoi,
    grid_mismatch,
    pixel_matrix,
    read_template,
)
from test_pair import CDELT, TEMPLATE, wcs_header


def _template(tmp_path: Path, text: str = TEMPLATE, name: str = "t.hdr") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _without(keyword: str, text: str = TEMPLATE) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith(keyword.ljust(8)))


def _replace(keyword: str, value: str, text: str = TEMPLATE) -> str:
    return "".join((f"{keyword.ljust(8)}= {value}" if line.startswith(keyword.ljust(8)) else line) + "\n"
                   for line in text.splitlines())


def _template_header(tmp_path: Path, text: str = TEMPLATE) -> fits.Header:
    return read_template(_template(tmp_path, text)).header


def test_good_template(tmp_path: Path) -> None:
    template = read_template(_template(tmp_path))
    assert (template.geometry.naxis1, template.geometry.naxis2) == (70, 55)
    assert (template.geometry.crpix1, template.geometry.crpix2) == (35.5, 27.25)
    assert template.header["CTYPE1"] == "RA---TAN"


def test_crlf_and_cd_matrix_template(tmp_path: Path) -> None:
    text = _without("CDELT1", _without("CDELT2", _without("CROTA2")))
    text = text.replace("END\n", f"CD1_1   = {-CDELT}\nCD1_2   = 0.0\nCD2_1   = 0.0\nCD2_2   = {CDELT}\nEND\n")
    template = read_template(_template(tmp_path, text.replace("\n", "\r\n")))
    assert pixel_matrix(template.header) == (-CDELT, 0.0, 0.0, CDELT)


def _loosen(text: str, layout) -> str:
    """The template with every valued card rewritten as ``layout(keyword, value)``."""
    lines = []
    for line in text.splitlines():
        if line[8:10] == "= ":
            lines.append(layout(line[:8].strip(), line[10:].strip()))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("layout", [
    lambda k, v: f"{k} = {v}",
    lambda k, v: f"{k}={v}",
    lambda k, v: f"  {k.ljust(8)}= {v}",
    lambda k, v: f"{k.ljust(10)}=   {v}",
    lambda k, v: f"{k.ljust(8)}= {v} / \u00b0 and \u2033 in a comment",
], ids=["spaced-equals", "no-spaces", "indented", "late-equals", "non-ascii-comment"])
def test_hand_written_card_layouts_read_as_montage_reads_them(tmp_path: Path, layout) -> None:
    """Montage's template readers take the keyword after leading blanks and the value
    after an ``=`` anywhere, and ignore comments: such templates are the same grid."""
    want = read_template(_template(tmp_path, TEMPLATE, "standard.hdr"))
    path = tmp_path / "loose.hdr"
    path.write_bytes(_loosen(TEMPLATE, layout).encode("utf-8"))
    got = read_template(path)
    assert got.geometry == want.geometry
    for keyword in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2", "CROTA2"):
        assert got.header[keyword] == want.header[keyword], keyword
    assert grid_mismatch(got.header, wcs_header(3, -4)) is None


def test_non_ascii_commentary_card_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "t.hdr"
    path.write_bytes(TEMPLATE.replace("END", "COMMENT pixel scale 1\u2033\nEND").encode("utf-8"))
    template = read_template(path)
    assert not any("COMMENT" in card for card in template.cards)


def test_crval_written_with_fewer_digits_is_the_same_grid(tmp_path: Path) -> None:
    """A template whose CRVAL is rounded to six decimals (under 0.1 pixel) matches images
    written with more digits; a tenth of a pixel off is another grid."""
    image = wcs_header(0, 0)
    exact1, exact2 = float(image["CRVAL1"]), float(image["CRVAL2"])
    image["CRVAL1"] = exact1 + 4.9e-7
    image["CRVAL2"] = exact2 - 4.9e-7
    assert grid_mismatch(_template_header(tmp_path), image) is None
    image["CRVAL2"] = exact2 - 0.11 * CDELT
    assert "CRVAL2" in grid_mismatch(_template_header(tmp_path), image)


def test_c_conversions_like_montage() -> None:
    assert c_atoi(" 42abc") == 42 and c_atoi("x") == 0
    assert c_atof("1.5e2x") == 150.0 and c_atof("-2.5D-04") == -2.5 and c_atof("") == 0.0


def _assert_template_error(path: Path, *fragments: str) -> None:
    with pytest.raises(TemplateError) as caught:
        read_template(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_template(tmp_path: Path) -> None:
    _assert_template_error(tmp_path / "absent.hdr", "not found")


def test_template_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.hdr").mkdir()
    _assert_template_error(tmp_path / "dir.hdr", "directory")


def test_simple_ending_in_blanks_and_a_tab_is_accepted_like_montage(tmp_path: Path) -> None:
    assert read_template(_template(tmp_path, _replace("SIMPLE", "T  \t"))).geometry.naxis1 > 0


def test_template_with_cr_only_line_ends_says_so(tmp_path: Path) -> None:
    (tmp_path / "t.hdr").write_bytes(TEMPLATE.replace("\n", "\r").encode())
    _assert_template_error(tmp_path / "t.hdr", "cannot be used as a header template", "CR only")


def test_fits_file_as_template(tmp_path: Path) -> None:
    fits.PrimaryHDU(np.zeros((5, 5), np.float32), header=wcs_header(0, 0)).writeto(tmp_path / "t.fits")
    _assert_template_error(tmp_path / "t.fits", "FITS file", "cannot be used as a header template")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\x00\x01\x02binary" * 50],
                         ids=["empty", "blank", "binary"])
def test_empty_or_binary_template(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "t.hdr").write_bytes(content)
    _assert_template_error(tmp_path / "t.hdr")


def test_long_lines(tmp_path: Path) -> None:
    _assert_template_error(_template(tmp_path, TEMPLATE.replace("EQUINOX = 2000.0", "EQUINOX = " + "2" * 80)),
                           "80 characters")


@pytest.mark.parametrize("keyword", ["BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "CTYPE1", "CTYPE2",
                                     "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2"])
def test_missing_keyword(tmp_path: Path, keyword: str) -> None:
    _assert_template_error(_template(tmp_path, _without(keyword)), keyword)


@pytest.mark.parametrize("keyword, value, fragment", [
    ("CTYPE1", "'RA--TAN'", "at least 8"),
    ("CTYPE2", "'DEC--SIN'", "projection mismatch"),
    ("CTYPE1", "'RADECXYZ'", "projection"),
    ("CDELT1", "'abc'", "CDELT1 is not a number"),
    ("CDELT2", "0.0", "singular"),
    ("NAXIS1", "0", "positive"),
    ("CRPIX1", "nan", "finite"),
    ("SIMPLE", "t", "illegal SIMPLE keyword value 't'"),
    ("SIMPLE", "'T'", "illegal SIMPLE keyword value"),
    ("SIMPLE", "T\t", "illegal SIMPLE keyword value 'T\\t'"),  # CFITSIO: the tab is in the value
    ("NAXIS", "1", "NAXIS must be at least 2"),
])
def test_invalid_keyword(tmp_path: Path, keyword: str, value: str, fragment: str) -> None:
    _assert_template_error(_template(tmp_path, _replace(keyword, value)), fragment)


def test_non_numeric_crval_in_template_is_accepted_like_montage(tmp_path: Path) -> None:
    header = _template_header(tmp_path, _replace("CRVAL1", "'abc'"))
    assert grid_mismatch(header, wcs_header(3, 4)) is None


# --------------------------------------------------------------------------------------
# images on (and off) the template grid
# --------------------------------------------------------------------------------------

def test_mproject_header_is_on_the_grid(tmp_path: Path) -> None:
    template = _template_header(tmp_path)
    for offset in ((0, 0), (-13, 7), (100, -50)):
        assert grid_mismatch(template, wcs_header(*offset)) is None


def test_float_formatting_does_not_matter(tmp_path: Path) -> None:
    text = _replace("CDELT1", "-2.7777777777778E-04", _replace("CDELT2", "2.7777777777778E-04"))
    template = _template_header(tmp_path, _replace("CRVAL1", "2.7000000000000E+02", text))
    image = fits.Header.fromstring(
        "CTYPE1  = 'RA---TAN'".ljust(80) + "CTYPE2  = 'DEC--TAN'".ljust(80)
        + "CRVAL1  =    270.0000000000001".ljust(80) + "CRVAL2  = -16.00000000000000".ljust(80)
        + "CRPIX1  = 1.0".ljust(80) + "CRPIX2  = 1.0".ljust(80)
        + "CDELT1  = -0.000277777777777778".ljust(80) + "CDELT2  = 2.777778E-04".ljust(80))
    assert grid_mismatch(template, image) is None


def test_equivalent_matrix_spellings_agree(tmp_path: Path) -> None:
    template = _template_header(tmp_path)
    cd = wcs_header(0, 0)
    for key in ("CDELT1", "CDELT2", "CROTA2"):
        del cd[key]
    cd["CD1_1"], cd["CD1_2"], cd["CD2_1"], cd["CD2_2"] = -CDELT, 0.0, 0.0, CDELT
    pc = wcs_header(0, 0)
    del pc["CROTA2"]
    pc["PC1_1"], pc["PC2_2"] = 1.0, 1.0
    assert grid_mismatch(template, cd) is None
    assert grid_mismatch(template, pc) is None


def test_longitudes_compare_modulo_360(tmp_path: Path) -> None:
    template = _template_header(tmp_path, _replace("CRVAL1", "0.0"))
    image = wcs_header(0, 0)
    image["CRVAL1"] = 360.0
    assert grid_mismatch(template, image) is None
    image["CRVAL1"] = 359.9
    assert "CRVAL1" in grid_mismatch(template, image)


def test_header_without_wcs_is_taken_on_trust(tmp_path: Path) -> None:
    template = _template_header(tmp_path)
    assert grid_mismatch(template, fits.Header([("CRPIX1", 1.0), ("CRPIX2", 2.0)])) is None
    assert grid_mismatch(template, {}) is None


@pytest.mark.parametrize("change, fragment", [
    ({"CTYPE1": "GLON-TAN"}, "CTYPE1 'GLON-TAN' differs"),
    ({"CTYPE2": "DEC--SIN"}, "CTYPE2"),
    ({"CDELT1": -CDELT * 1.00001}, "pixel scale"),
    ({"CDELT2": CDELT * 2}, "pixel scale"),
    ({"CROTA2": 0.5}, "rotation"),
    ({"CD1_1": -CDELT, "CD1_2": 1e-6, "CD2_1": 0.0, "CD2_2": CDELT}, "rotation"),
    ({"PC1_1": 0.9, "PC1_2": 0.1}, "rotation"),
    ({"CRVAL1": 270.0 + CDELT}, "CRVAL1"),
    ({"CRVAL2": -16.0 - CDELT / 5}, "CRVAL2"),
    ({"CDELT1": "abc"}, "CDELT1 is not a number"),
    ({"CRVAL2": "abc"}, "CRVAL2 is not a number"),
    ({"CD1_1": float("nan")}, "CD1_1 is not a number"),
], ids=["ctype1", "ctype2", "cdelt1", "cdelt2", "crota2", "cd", "pc", "crval1", "crval2",
        "text-cdelt", "text-crval", "nan-cd"])
def test_off_grid_images_are_named(tmp_path: Path, change: dict, fragment: str) -> None:
    template = _template_header(tmp_path)
    image = dict(wcs_header(0, 0))
    image.update(change)
    problem = grid_mismatch(template, image)
    assert problem is not None and fragment in problem


@st.composite
def damaged_templates(draw) -> bytes:
    """The good template with lines dropped, duplicated or garbled, or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=400))
    lines = TEMPLATE.splitlines()
    for _ in range(draw(st.integers(0, 6))):
        k = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "dup", "garble", "value"]))
        if action == "drop":
            del lines[k]
        elif action == "dup":
            lines.insert(k, lines[k])
        elif action == "garble":
            chars = list(lines[k])
            if chars:
                chars[draw(st.integers(0, len(chars) - 1))] = draw(st.sampled_from(list("'= .-\x00\xffE9")))
            lines[k] = "".join(chars)
        elif lines and "=" in lines[k]:
            lines[k] = lines[k].split("=")[0] + "= " + draw(st.sampled_from(
                ["'abc'", "T", "1e999", "nan", "-0", "0", "''", "'RA---TAN'", "1.5D2", "(1, 2)"]))
        if not lines:
            break
    return "\n".join(lines).encode("latin-1")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=damaged_templates())
def test_damaged_templates_give_one_line_errors(content: bytes, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("tpl") / "t.hdr"
    path.write_bytes(content)
    try:
        template = read_template(path)
    except TemplateError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    assert template.geometry.naxis1 > 0 and template.geometry.naxis2 > 0
    problem = grid_mismatch(template.header, wcs_header(1, 2))
    assert problem is None or (isinstance(problem, str) and problem)


def test_plain_template_is_parsed_without_astropy_and_odd_cards_through_it(tmp_path: Path) -> None:
    """Both parsers give the same keyword values; kept difference images get the cards."""
    from diffit.headers import template_fits_header

    plain = read_template(_template(tmp_path))
    assert isinstance(plain.header, dict)
    odd = read_template(_template(tmp_path, TEMPLATE.replace("END", "history lower-case\nEND"),
                                  name="odd.hdr"))
    assert isinstance(odd.header, fits.Header)
    for key, value in plain.header.items():
        assert odd.header[key] == value and type(odd.header[key]) is type(value), key
    cards = template_fits_header(plain)
    assert isinstance(cards, fits.Header)
    assert {key: cards[key] for key in plain.header} == plain.header
    assert grid_mismatch(plain.header, wcs_header(1, 2)) == grid_mismatch(odd.header, wcs_header(1, 2))
