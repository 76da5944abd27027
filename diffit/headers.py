"""Template (.hdr) and image-header parsing.

The template is Montage's text header: one FITS card per line. It is validated once
per run (Montage re-validates it for every pair) and its pixel grid is read the way
mDiff reads it: the keyword is the first token of the line, the value the next token
(quotes and ``=`` skipped), converted with C ``atoi``/``atof`` and the last occurrence
winning. Hand-written card layouts that Montage reads (``KEY = value``, ``KEY=value``,
indented cards, comments that are not ASCII) are first rewritten as standard cards. The
cards are then parsed with :mod:`diffit.fitsheader` when they are all plain standard
cards (the usual case), else with astropy, which also words any error.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffit.fitsheader import NotSimple, parse_card, parse_cards
from diffit.fitsio import quiet_astropy
from diffit.geometry import GridGeometry

if TYPE_CHECKING:
    from astropy.io import fits

_REQUIRED = ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "CTYPE1", "CTYPE2",
             "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2")
_CD_KEYS = ("CD1_1", "CD1_2", "CD2_1", "CD2_2")
_INT_PREFIX = re.compile(r"\s*[+-]?\d+")
_FLOAT_PREFIX = re.compile(
    r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE
)


class TemplateError(ValueError):
    """The template header is missing, unreadable or incomplete."""


def c_atoi(text: str) -> int:
    """C ``atoi``: the leading integer of ``text`` (after blanks), else 0."""
    match = _INT_PREFIX.match(text)
    return int(match.group()) if match else 0


def c_atof(text: str) -> float:
    """C ``atof``: the leading floating-point number of ``text``, else 0.0."""
    match = _FLOAT_PREFIX.match(text)
    return float(match.group()) if match else 0.0


def _keyword_and_value(line: str) -> tuple[str, str]:
    """Split a template line as mDiff's simple parser does."""
    line = line[:80].ljust(80)
    rest = line.lstrip(" ")
    keyword = re.match(r"[^ =]*", rest).group()
    rest = rest[len(keyword):].lstrip("= '")
    value = re.match(r"[^ ']*", rest).group()
    return keyword, value


@dataclass(frozen=True)
class Template:
    """A validated template header.

    Attributes
    ----------
    path : str
        The template file, as given.
    geometry : GridGeometry
        NAXIS1/2 and CRPIX1/2 as mDiff reads them.
    header : dict or astropy.io.fits.Header
        Keyword values of all cards.
    digest : str
        SHA-256 of the file's bytes: equal templates compare (and hash) equal, so
        per-image results that depend on the template can be cached by it.
    cards : tuple of str
        The card lines, for the headers of kept difference images
        (:func:`template_fits_header`).
    """

    path: str
    geometry: GridGeometry
    header: Any = field(compare=False)
    digest: str = ""
    cards: tuple[str, ...] = field(default=(), compare=False, repr=False)


def _looks_like_fits(raw: bytes) -> bool:
    return raw.startswith(b"SIMPLE  =") and b"\n" not in raw[:2880]


def read_template(path: str | os.PathLike) -> Template:
    """Read and validate a Montage text header template.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.hdr`` file.

    Returns
    -------
    Template

    Raises
    ------
    TemplateError
        With a one-line message naming the file and the problem.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise TemplateError(f"Template file {name} not found") from None
    except IsADirectoryError:
        raise TemplateError(f"Template file {name} is a directory") from None
    except OSError as error:
        raise TemplateError(f"Template file {name} cannot be read: {error.strerror}") from None
    except ValueError:  # e.g. an embedded NUL in the name
        raise TemplateError(f"Template file {name!r} is not a usable file name") from None
    if _looks_like_fits(raw):
        hint = " (its lines end in CR only: convert them to LF)" if b"\r" in raw and b"\n" not in raw else ""
        raise TemplateError(f"FITS file ({name}) cannot be used as a header template{hint}")
    if b"\0" in raw:
        raise TemplateError(f"Template file {name} is not a text header (binary content)")
    text = raw.decode("latin-1")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise TemplateError(f"Template file {name} is empty")
    if any(len(line) > 80 for line in lines):
        raise TemplateError(
            f"Template file {name}: FITS header lines cannot be greater than 80 characters"
        )
    values: dict[str, str] = {}
    for line in lines:
        keyword, value = _keyword_and_value(line)
        values[keyword] = value
    for keyword in _REQUIRED:
        if keyword not in values:
            raise TemplateError(f"Template file {name}: no {keyword} keyword")
    for line in lines:  # Montage fails every pair on these (CFITSIO and WCS checks)
        match = _LOOSE_CARD.match(line)
        if match is not None and match.group(1) == "SIMPLE":
            # CFITSIO's template parser ends the value at a blank (a tab is part of it)
            simple = re.match(r"[^ /]*", match.group(2).lstrip(" ")).group()
            if simple not in ("T", "F"):
                raise TemplateError(
                    f"Template file {name}: illegal SIMPLE keyword value {simple!r} (must be T or F)")
    if c_atoi(values["NAXIS"]) < 2:
        raise TemplateError(f"Template file {name}: NAXIS must be at least 2")
    if not any(k in values for k in _CD_KEYS):
        for keyword in ("CDELT1", "CDELT2"):
            if keyword not in values:
                raise TemplateError(
                    f"Template file {name}: no {keyword} keyword (or incomplete CD matrix)"
                )
    cards = tuple(card for line in lines if line.strip() and line.split()[0] != "END"
                  and (card := _standard_card(line)) is not None)
    try:
        header: Any = parse_cards(cards)
    except NotSimple:
        header = _parse_cards(name, cards)
    for axis in ("1", "2"):
        ctype = str(header.get("CTYPE" + axis, ""))
        if len(ctype) < 8:
            raise TemplateError(f"Template file {name}: CTYPE{axis} must be at least 8 characters")
    projection1 = _projection(str(header["CTYPE1"]))
    projection2 = _projection(str(header["CTYPE2"]))
    if not projection1 or not projection2:
        raise TemplateError(f"Template file {name}: invalid CTYPE1 or CTYPE2 projection")
    if projection1 != projection2:
        raise TemplateError(f"Template file {name}: CTYPE1, CTYPE2 projection mismatch")
    try:
        matrix = pixel_matrix(header)
    except (KeyError, ValueError) as error:
        raise TemplateError(f"Template file {name}: {error.args[0]} is not a number") from None
    if matrix is None:
        raise TemplateError(f"Template file {name}: no usable CDELT1/CDELT2 or CD matrix")
    if matrix[0] * matrix[3] - matrix[1] * matrix[2] == 0.0:
        raise TemplateError(f"Template file {name}: the pixel scale (CDELT/CD matrix) is singular")
    geometry = GridGeometry(
        naxis1=c_atoi(values["NAXIS1"]),
        naxis2=c_atoi(values["NAXIS2"]),
        crpix1=c_atof(values["CRPIX1"]),
        crpix2=c_atof(values["CRPIX2"]),
    )
    if geometry.naxis1 <= 0 or geometry.naxis2 <= 0:
        raise TemplateError(f"Template file {name}: NAXIS1/NAXIS2 must be positive")
    if not (math.isfinite(geometry.crpix1) and math.isfinite(geometry.crpix2)):
        raise TemplateError(f"Template file {name}: CRPIX1/CRPIX2 must be finite numbers")
    return Template(path=name, geometry=geometry, header=header,
                    digest=hashlib.sha256(raw).hexdigest(), cards=cards)


_LOOSE_CARD = re.compile(r" *([^ =]+) *=(.*)\Z")
_STANDARD_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}\Z")
_COMMENTARY = ("COMMENT", "HISTORY")


def _standard_card(line: str) -> str | None:
    """A template line as a standard FITS card, read the way Montage reads it.

    Montage's template readers (mDiff's and the header check's tokenisers, the WCS
    library's keyword search) take a keyword after leading blanks and a value after an
    ``=`` anywhere on the line, and never look at comments. So ``KEY = value``,
    ``KEY=value`` and indented cards are rewritten in the standard layout, and a comment
    that is not printable ASCII (a degree sign, say) is dropped. Commentary cards that
    are not printable ASCII are dropped (None). Lines already standard, and lines of
    another shape, are returned unchanged for the strict parsers to judge.
    """
    try:
        parse_card(line)
        return line
    except NotSimple:
        pass
    stripped = line.strip(" ")
    if stripped.split(" ", 1)[0] in _COMMENTARY:
        return line if _printable(line) else None
    match = _LOOSE_CARD.match(line)
    if match is None or not _STANDARD_KEYWORD.match(match.group(1)):
        return line
    keyword, rest = match.groups()
    value, comment = _value_and_comment(rest)
    card = f"{keyword:<8}= {value:>20}"
    if comment and _printable(comment) and len(card) + 3 + len(comment) <= 80:
        card += " / " + comment
    return card if len(card) <= 80 and _printable(card) else line


def _value_and_comment(text: str) -> tuple[str, str]:
    """Split what follows a card's ``=`` into its value (a quoted string keeps its
    quotes, doubled quotes included) and its comment (after a ``/``)."""
    text = text.strip(" ")
    if text.startswith("'"):
        end = 1
        while True:
            end = text.find("'", end)
            if end < 0:
                return text.rstrip(" ") + "'", ""  # unterminated: close it
            if text[end + 1:end + 2] == "'":
                end += 2
                continue
            value, rest = text[:end + 1], text[end + 1:].strip(" ")
            return value, rest[1:].strip(" ") if rest.startswith("/") else rest
    value, _, comment = text.partition("/")
    return value.strip(" "), comment.strip(" ")


def _printable(text: str) -> bool:
    return all(" " <= character <= "~" for character in text)


def _projection(ctype: str) -> str:
    """Projection code of a CTYPE value: what follows the run of dashes."""
    stripped = ctype.split("-", 1)
    return stripped[1].lstrip("-").strip() if len(stripped) == 2 else ""


def _parse_cards(name: str, cards: tuple[str, ...]) -> "fits.Header":
    from astropy.io import fits

    header = fits.Header()
    with quiet_astropy():
        for line in cards:
            _append_card(fits, header, name, line)
    return header


@functools.lru_cache(maxsize=4)
def template_fits_header(template: Template) -> "fits.Header":
    """The template's cards as an astropy header (for writing kept difference images).

    Do not modify the result (it is cached): copy it.
    """
    if not isinstance(template.header, dict):
        return template.header
    return _parse_cards(template.path, template.cards)


def _append_card(fits, header: "fits.Header", name: str, line: str) -> None:
    """Parse one template line into ``header`` (TemplateError for a malformed card)."""
    try:
        card = fits.Card.fromstring(line.ljust(80))
        card.verify("silentfix")
        if card.keyword in ("", "END"):
            return
        header.append(card, end=True)
    except Exception as error:  # astropy raises several types on bad cards
        detail = " ".join(str(error).split())  # astropy's messages span several lines
        raise TemplateError(f"Template file {name}: bad header card {line.strip()!r} ({detail})") from None


def _number(header, key: str) -> float | None:
    """A header value as a finite float, or None when absent or not a finite number."""
    try:
        value = header.get(key) if hasattr(header, "get") else None
    except Exception:  # noqa: BLE001 - a mapping with odd keys
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _BadValue(ValueError):
    """A WCS keyword whose value is present but not a finite number."""


def _required_number(header, key: str, default: float | None = None) -> float:
    if key not in header:
        if default is None:
            raise KeyError(key)
        return default
    value = _number(header, key)
    if value is None:
        raise _BadValue(key)
    return value


def pixel_matrix(header) -> tuple[float, float, float, float] | None:
    """The 2x2 pixel-to-intermediate-world matrix of a FITS header, or None without one.

    CD keywords take precedence, then PCi_j times CDELTi, then CDELTi with CROTA2.

    Parameters
    ----------
    header : mapping
        The header (a dict or an astropy header).

    Returns
    -------
    tuple of 4 floats or None
        ``(CD1_1, CD1_2, CD2_1, CD2_2)``, or None when the header has no CD matrix and
        not both CDELTs.

    Raises
    ------
    ValueError
        A matrix keyword is present but is not a finite number (the message is the
        keyword).
    """
    if any(k in header for k in _CD_KEYS):
        return tuple(_required_number(header, k, 0.0) for k in _CD_KEYS)  # type: ignore[return-value]
    if "CDELT1" not in header or "CDELT2" not in header:
        return None
    cdelt1 = _required_number(header, "CDELT1")
    cdelt2 = _required_number(header, "CDELT2")
    if any(k in header for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2")):
        pc = (_required_number(header, "PC1_1", 1.0), _required_number(header, "PC1_2", 0.0),
              _required_number(header, "PC2_1", 0.0), _required_number(header, "PC2_2", 1.0))
        return (cdelt1 * pc[0], cdelt1 * pc[1], cdelt2 * pc[2], cdelt2 * pc[3])
    rotation = math.radians(_required_number(header, "CROTA2", 0.0))
    cos, sin = math.cos(rotation), math.sin(rotation)
    return (cdelt1 * cos, -cdelt2 * sin, cdelt1 * sin, cdelt2 * cos)


#: Relative tolerance on the pixel matrix: headers written with fewer digits (e.g.
#: ``-2.7777777777778E-04`` for ``-0.000277777777777778``) still match, while a real
#: change of scale or rotation (over 1e-6, i.e. 0.01 pixel across 10,000 pixels) does not.
MATRIX_TOLERANCE = 1e-6
#: Tolerance on CRVAL, in pixels of the template's scale: a template written with fewer
#: digits than its images (six decimals of a degree are up to 0.06 pixel of a 0.03"
#: grid) is the same grid; an image projected onto another grid is off by more.
CRVAL_TOLERANCE_PIXELS = 0.1


def _is_longitude(ctype: object) -> bool:
    code = str(ctype).strip().upper()[:4]
    return code.startswith("RA") or code[1:4] == "LON"


def _ctype(header, key: str) -> str:
    return str(header.get(key, "")).strip()


def grid_mismatch(template, image) -> str | None:
    """Why ``image`` is not on the template's pixel grid, or None when it is (or can't tell).

    Montage's mDiff assumes every image shares the template's projection, reference
    point and pixel matrix, and only reads CRPIX and NAXIS; an image on another grid
    would be differenced pixel by pixel anyway and give a meaningless fit. This compares
    CTYPE1/2 exactly, the pixel matrices (CD, PC*CDELT or CDELT with CROTA2, so that
    equivalent spellings agree) to a relative :data:`MATRIX_TOLERANCE`, and CRVAL1/2 to
    :data:`CRVAL_TOLERANCE_PIXELS` pixels (longitudes modulo 360 degrees). Keywords the
    image does not have are taken on trust, as Montage does; so are template values
    that are not numbers.

    Parameters
    ----------
    template, image : mapping
        Headers to compare (dicts or astropy headers).

    Returns
    -------
    str or None
        A short description of the first difference found.
    """
    for axis in ("1", "2"):
        key = "CTYPE" + axis
        if key in image and _ctype(image, key) != _ctype(template, key):
            return f"{key} {_ctype(image, key)!r} differs from the template's {_ctype(template, key)!r}"
    try:
        template_matrix = pixel_matrix(template)
    except (KeyError, ValueError):
        template_matrix = None
    try:
        image_matrix = pixel_matrix(image)
    except (KeyError, ValueError) as error:
        return f"{error.args[0]} is not a number"
    scale = max((abs(v) for v in template_matrix), default=0.0) if template_matrix else 0.0
    if template_matrix is not None and image_matrix is not None:
        tolerance = MATRIX_TOLERANCE * (scale or 1.0)
        if any(abs(a - b) > tolerance for a, b in zip(template_matrix, image_matrix)):
            return "pixel scale or rotation (CDELT/CD/PC/CROTA2) differs from the template's"
    for axis in ("1", "2"):
        key = "CRVAL" + axis
        if key not in image:
            continue
        value = _number(image, key)
        if value is None:
            return f"{key} is not a number"
        reference = _number(template, key)
        if reference is None:
            continue
        difference = abs(value - reference)
        if _is_longitude(template.get("CTYPE" + axis, "")):
            difference = difference % 360.0
            difference = min(difference, 360.0 - difference)
        if difference > CRVAL_TOLERANCE_PIXELS * (scale or 1.0):
            return f"{key} = {value!r} differs from the template's {reference!r}"
    return None
