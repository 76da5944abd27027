"""Table I/O for diffit: the overlap table (diffs.tbl) and the fit table (fits.tbl).

The overlap table is read the way Montage's ``mtbl`` library reads it, byte for
byte, so that ``diffit`` sees exactly the records Montage's ``mDiffFitExec``
sees, including its quirks:

* The file is read in ``fgets`` chunks of at most 4095 bytes; a longer line is
  split, and each piece is a line of its own (a 4095-byte line followed by its
  newline therefore yields an extra, blank, record).
* Leading lines that are blank (spaces/tabs only) or start with ``\\`` are
  keyword/comment lines.  The first other line is the column-name line; it
  need not start with ``|``.
* Column ``k`` ends at the ``k``-th ``|`` of the name line (a ``|`` in column 0
  is only a left delimiter).  Names are the non-blank characters between the
  bars; only spaces are blank here, so a tab is part of a name.  A ``\\`` ends
  the name line.  Text after the last ``|`` is not a column.
* Data are sliced at fixed character positions; the character under a ``|``
  position is dropped; values are trimmed of spaces (not tabs).
* Lines starting with ``\\`` or ``|`` after the name line are skipped; blank
  lines are records with empty values.  One trailing ``\\n`` and then one
  trailing ``\\r`` are removed.
* The line buffer is cleared once per record, so a skipped ``\\``/``|`` line
  that is longer than the record line following it leaves its tail in the
  buffer, and the fixed-position slicing picks up that tail (e.g. a blank
  line after ``|     `` gets a ``plus`` value of ``"\\n"``).
* Bytes are handled like C strings: text after a NUL byte is invisible to the
  string functions, while the fixed-position slicing still sees the raw
  buffer, and the data start offset is computed from the C string lengths of
  the header lines (as ``mtbl`` does).

Values are decoded from bytes as UTF-8 with ``surrogateescape``, so that file
names re-encode to the exact bytes found in the table, and arbitrary (binary)
input never raises :class:`UnicodeDecodeError`.

The fit table is written with Montage's exact header line and C ``printf``
row formats (glibc rendering of ``nan``/``-nan``/``inf``; x86-64 semantics of
the double-to-int conversion used for xmin..ymax).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Union

from diffit.fitplane import PlaneFit

__all__ = [
    "FITS_TBL_HEADER",
    "FITS_TBL_COLUMNS",
    "OverlapPair",
    "TableError",
    "c_atoi",
    "format_fit_row",
    "format_overlap_table",
    "iter_overlap_table",
    "read_fits_table",
    "read_overlap_table",
]

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: ``fgets(buf, MTBL_MAXSTR, f)`` reads at most ``MTBL_MAXSTR - 1`` bytes.
_MTBL_MAXSTR = 4096
_CHUNK = _MTBL_MAXSTR - 1

_REQUIRED = (b"cntr1", b"cntr2", b"plus", b"minus", b"diff")

_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1
_LONG_MIN = -(2**63)
_LONG_MAX = 2**63 - 1


class TableError(ValueError):
    """A table that Montage would reject; ``str(err)`` is Montage's exact message.

    ``reason``, when known, says why (Montage's message does not): diffit's own command
    line adds it.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class OverlapPair:
    """One record of the overlap table, as ``mDiffFitExec`` sees it.

    Attributes
    ----------
    index : int
        0-based record number (blank records count, as in Montage).
    cntr1, cntr2 : int
        Image counters, converted with C ``atoi`` semantics.
    plus, minus : str
        Image file names (raw table values).
    diff : str
        Difference file name as in the table; the caller applies Montage's
        rule of appending ``s`` when the last character is not ``s``.
    """

    index: int
    cntr1: int
    cntr2: int
    plus: str
    minus: str
    diff: str


# --------------------------------------------------------------------------
# small C emulation helpers
# --------------------------------------------------------------------------

def _cstr(buf: bytes) -> bytes:
    """Return ``buf`` up to (not including) its first NUL byte."""
    nul = buf.find(b"\0")
    return buf if nul < 0 else buf[:nul]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


_ATOI_RE = re.compile(rb"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def c_atoi(raw: bytes | str) -> int:
    """C ``atoi`` as glibc implements it (``(int) strtol(s, NULL, 10)``).

    Leading white space and an optional sign are accepted; parsing stops at the
    first non-digit; no digits gives 0.  Out-of-range values saturate to the
    ``long`` range (64 bit) and are then narrowed to 32-bit ``int`` by keeping
    the low 32 bits.

    Parameters
    ----------
    raw : bytes or str
        The text to convert (a ``str`` is encoded as UTF-8/surrogateescape).

    Returns
    -------
    int
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    m = _ATOI_RE.match(_cstr(raw))
    if m is None:
        return 0
    value = int(m.group(1))
    value = min(max(value, _LONG_MIN), _LONG_MAX)
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _path_text(path: PathLike) -> str:
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


# --------------------------------------------------------------------------
# overlap table (diffs.tbl) reader
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Result of the header pass: where data start and how to slice them."""

    data_offset: int
    slices: tuple[tuple[int, int], ...]  # (start, end) for cntr1 cntr2 plus minus diff


def _parse_names(line: bytes) -> list[tuple[bytes, int]]:
    """Column names and end positions from the column-name line (C string)."""
    if line[:1] == b"|":
        line = b" " + line[1:]
    cols: list[tuple[bytes, int]] = []
    name = bytearray()
    for i, ch in enumerate(line):
        if ch == 0x5C or ch == 0x0A:  # backslash or newline end the line
            break
        if ch == 0x7C:  # '|'
            cols.append((bytes(name), i))
            name = bytearray()
        elif ch != 0x20:
            name.append(ch)
    return cols


def _read_layout(path: PathLike, shown: str) -> _Layout:
    def invalid(reason: str | None = None) -> TableError:
        return TableError(f"Invalid diffs metadata file: {shown}", reason)

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as error:
        raise invalid(error.strerror) from None
    except ValueError:
        raise invalid("not a usable file name") from None
    try:
        headbytes = 0
        cols: list[tuple[bytes, int]] = []
        # keyword / comment lines, then the column-name line.  At EOF without
        # a column-name line mtbl is left with a blank or '\\' line: no columns.
        while True:
            chunk = f.readline(_CHUNK)
            if not chunk:
                break
            s = _cstr(chunk)
            headbytes += len(s)
            if s.endswith(b"\n"):
                s = s[:-1]
            if s.endswith(b"\r"):
                s = s[:-1]
            if s.strip(b" \t") and s[:1] != b"\\":
                cols = _parse_names(s)
                break
        if not cols:
            raise invalid("no line of column names")
        # type / unit / null (and any further) lines starting with '|'
        while True:
            chunk = f.readline(_CHUNK)
            if not chunk or chunk[:1] != b"|":
                break
            headbytes += len(_cstr(chunk))
    except OSError as error:
        raise invalid(error.strerror) from None
    finally:
        f.close()

    index: dict[bytes, int] = {}
    for k, (name, _end) in enumerate(cols):
        index.setdefault(name, k)  # tcol(): first column with that name
    if any(name not in index for name in _REQUIRED):
        raise TableError("Need columns: cntr1 cntr2 plus minus diff")
    slices = []
    for name in _REQUIRED:
        k = index[name]
        start = 0 if k == 0 else cols[k - 1][1] + 1
        slices.append((start, cols[k][1]))
    return _Layout(data_offset=headbytes, slices=tuple(slices))


def _split_record(chunk: bytes, layout: _Layout) -> list[bytes]:
    """Slice one data chunk into the five required raw values (mtbl ``tread``)."""
    if b"\0" not in chunk:
        if chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
        return [chunk[a:b].strip(b" ") for a, b in layout.slices]
    # C-string semantics: strlen() stops at the first NUL, but the slicing
    # works on the raw (zero-filled) buffer.
    buf = bytearray(chunk)
    for terminator in (0x0A, 0x0D):
        n = buf.find(0)
        n = len(buf) if n < 0 else n
        if n > 0 and buf[n - 1] == terminator:
            buf[n - 1] = 0
    raw = bytes(buf)
    out = []
    for a, b in layout.slices:
        field = raw[a:b].rstrip(b" \0").lstrip(b" ")
        out.append(_cstr(field))
    return out


def _records(path: PathLike, shown: str, layout: _Layout) -> Iterator[OverlapPair]:
    try:
        f = open(path, "rb")  # noqa: SIM115
    except (OSError, ValueError):
        raise TableError(f"Invalid diffs metadata file: {shown}") from None
    (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5) = layout.slices
    atoi = c_atoi
    with f:
        f.seek(layout.data_offset)
        index = 0
        readline = f.readline
        # mtbl zeroes its line buffer once per record, then reads lines into
        # it, skipping those that start with '\\' or '|'.  A skipped line
        # longer than the record line leaves its tail in the buffer, where the
        # fixed-position slicing can see it.
        residue = b""
        for chunk in iter(lambda: readline(_CHUNK), b""):
            first = chunk[:1]
            if first == b"\\" or first == b"|":
                residue = chunk + b"\0" + residue[len(chunk) + 1 :]
                continue
            if len(residue) > len(chunk) + 1:
                chunk = chunk + b"\0" + residue[len(chunk) + 1 :]
            residue = b""
            if b"\0" in chunk:
                c1, c2, plus, minus, diff = _split_record(chunk, layout)
            else:  # fast path, same result as _split_record
                if chunk[-1:] == b"\n":
                    chunk = chunk[:-1]
                if chunk[-1:] == b"\r":
                    chunk = chunk[:-1]
                c1 = chunk[a1:b1].strip(b" ")
                c2 = chunk[a2:b2].strip(b" ")
                plus = chunk[a3:b3].strip(b" ")
                minus = chunk[a4:b4].strip(b" ")
                diff = chunk[a5:b5].strip(b" ")
            yield OverlapPair(
                index,
                int(c1) if len(c1) < 10 and c1.isdigit() else atoi(c1),
                int(c2) if len(c2) < 10 and c2.isdigit() else atoi(c2),
                plus.decode("utf-8", "surrogateescape"),
                minus.decode("utf-8", "surrogateescape"),
                diff.decode("utf-8", "surrogateescape"),
            )
            index += 1


def iter_overlap_table(path: PathLike) -> Iterator[OverlapPair]:
    """Stream the records of an overlap table (diffs.tbl) with mtbl semantics.

    The header is read and validated immediately, so errors are raised by this
    call, before anything is yielded.  Records are then read lazily, one line
    at a time (the file is reopened when iteration starts).

    Parameters
    ----------
    path : str or os.PathLike
        The table file.

    Returns
    -------
    Iterator[OverlapPair]
        One item per data record, blank lines included.

    Raises
    ------
    TableError
        ``Invalid diffs metadata file: <path>`` for a missing, unreadable or
        empty file or one whose column-name line has no ``|``;
        ``Need columns: cntr1 cntr2 plus minus diff`` if a required column is
        missing.
    """
    shown = _path_text(path)
    layout = _read_layout(path, shown)
    return _records(path, shown, layout)


def read_overlap_table(path: PathLike) -> list[OverlapPair]:
    """Read a whole overlap table; see :func:`iter_overlap_table`.

    Parameters
    ----------
    path : str or os.PathLike
        The table file.

    Returns
    -------
    list[OverlapPair]
    """
    return list(iter_overlap_table(path))


# --------------------------------------------------------------------------
# overlap table writer (mOverlaps layout)
# --------------------------------------------------------------------------

def _blen(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _rjust(text: str, width: int) -> str:
    """``printf("%*s", width, text)``: pads by byte length, never truncates."""
    return " " * max(width - _blen(text), 0) + text


def format_overlap_table(
    rows: Iterable[tuple[int, int, str, str, str]], *, namelen: int | None = None
) -> str:
    """Format an overlap table exactly as Montage's mOverlaps writes it.

    Parameters
    ----------
    rows : iterable of (cntr1, cntr2, plus, minus, diff)
        One tuple per overlapping pair.
    namelen : int, optional
        Width used for the plus/minus columns.  mOverlaps uses the longest
        file name in the *image* table; by default the longest plus/minus
        name among ``rows`` (0 if there are none) is used.

    Returns
    -------
    str
        Header line, type line and one line per row, each ending in ``\\n``.

    Notes
    -----
    As in mOverlaps, names shorter than 5 bytes (``minus``) make the header
    wider than the rows, so such a table does not read back as written.
    """
    rows = list(rows)
    if namelen is None:
        namelen = max((max(_blen(r[2]), _blen(r[3])) for r in rows), default=0)
    out = [
        f"| cntr1 | cntr2 |{_rjust('plus', namelen)} |{_rjust('minus', namelen)} "
        "|         diff             |\n",
        f"| int   | int   |{_rjust('char', namelen)} |{_rjust('char', namelen)} "
        "|         char             |\n",
    ]
    for cntr1, cntr2, plus, minus, diff in rows:
        out.append(
            f"{int(cntr1):8d}{int(cntr2):8d} {_rjust(plus, namelen)}  "
            f"{_rjust(minus, namelen)}  {diff}\n"
        )
    return "".join(out)


# --------------------------------------------------------------------------
# fit table (fits.tbl)
# --------------------------------------------------------------------------

FITS_TBL_HEADER: str = (
    "|   plus  |  minus  |         a      |        b       |        c       "
    "|    crpix1    |    crpix2    |   xmin   |   xmax   |   ymin   |   ymax   "
    "|   xcenter   |   ycenter   |    npixel   |      rms       |      boxx      "
    "|      boxy      |    boxwidth    |   boxheight    |     boxang     |\n"
)

#: Column names of fits.tbl, in order.
FITS_TBL_COLUMNS: tuple[str, ...] = (
    "plus", "minus", "a", "b", "c", "crpix1", "crpix2", "xmin", "xmax", "ymin",
    "ymax", "xcenter", "ycenter", "npixel", "rms", "boxx", "boxy", "boxwidth",
    "boxheight", "boxang",
)

_INT_COLUMNS = frozenset({"plus", "minus", "xmin", "xmax", "ymin", "ymax", "npixel"})


def _cfloat(value: float, width: int, prec: int, conv: str) -> str:
    """glibc ``printf("%<width>.<prec><conv>", value)`` for a double."""
    value = float(value)
    if math.isnan(value):
        text = "-nan" if math.copysign(1.0, value) < 0 else "nan"
        return text.rjust(width)
    # Python renders finite values (correctly rounded) and +-inf as glibc does
    return f"{value:{width}.{prec}{conv}}"


def _c_double_to_int(value: float) -> int:
    """C ``(int)`` conversion of a double as x86-64 ``cvttsd2si`` performs it.

    Truncation toward zero; NaN, infinities and out-of-range values give
    ``INT_MIN`` (the "integer indefinite" value).
    """
    value = float(value)
    if not math.isfinite(value):
        return _INT_MIN
    t = math.trunc(value)
    return t if _INT_MIN <= t <= _INT_MAX else _INT_MIN


def format_fit_row(cntr1: int, cntr2: int, fit: PlaneFit) -> str:
    """Format one fits.tbl row exactly as Montage's mDiffFitExec writes it.

    Parameters
    ----------
    cntr1, cntr2 : int
        The pair's image counters (C ``int``).
    fit : PlaneFit
        The plane fit; xmin..ymax are truncated toward zero as C does.

    Returns
    -------
    str
        The row: a leading space, the 20 fields separated by single spaces, a
        trailing space and ``\\n``.
    """
    e = lambda v: _cfloat(v, 16, 5, "e")  # noqa: E731
    f = _cfloat
    fields = [
        f"{int(cntr1):9d}",
        f"{int(cntr2):9d}",
        e(fit.a),
        e(fit.b),
        e(fit.c),
        f(fit.crpix1, 14, 2, "f"),
        f(fit.crpix2, 14, 2, "f"),
        f"{_c_double_to_int(fit.xmin):10d}",
        f"{_c_double_to_int(fit.xmax):10d}",
        f"{_c_double_to_int(fit.ymin):10d}",
        f"{_c_double_to_int(fit.ymax):10d}",
        f(fit.xcenter, 13, 2, "f"),
        f(fit.ycenter, 13, 2, "f"),
        f(fit.npixel, 13, 0, "f"),
        e(fit.rms),
        f(fit.boxx, 16, 1, "f"),
        f(fit.boxy, 16, 1, "f"),
        f(fit.boxwidth, 16, 1, "f"),
        f(fit.boxheight, 16, 1, "f"),
        f(fit.boxang, 16, 1, "f"),
    ]
    return " " + " ".join(fields) + " \n"


def _fits_value(name: str, token: str) -> int | float:
    if name in _INT_COLUMNS:
        try:
            return int(token)
        except ValueError:
            return int(float(token))
    return float(token)


def read_fits_table(path: PathLike) -> list[dict[str, Any]]:
    """Parse a fits.tbl (Montage's or diffit's) into one dict per row.

    Parameters
    ----------
    path : str or os.PathLike
        The fit table.

    Returns
    -------
    list of dict
        Keys ``plus, minus, a, b, c, crpix1, crpix2, xmin, xmax, ymin, ymax,
        xcenter, ycenter, npixel, rms, boxx, boxy, boxwidth, boxheight,
        boxang`` (in the order of :data:`FITS_TBL_COLUMNS`); ``plus``,
        ``minus``, ``xmin``..``ymax`` and ``npixel`` are ``int``, the others
        ``float`` (``nan``/``-nan``/``inf`` accepted).

    Raises
    ------
    TableError
        If the file cannot be read, has no ``|`` header with all 20 columns,
        or has a malformed row.  An incomplete last line (no newline, as left
        by an interrupted run) that does not parse is ignored.

    Notes
    -----
    Rows are split on white space, not by column positions, so values wider
    than their column (which shift the layout) are still read correctly.
    """
    shown = _path_text(path)
    invalid = TableError(f"Invalid fits table: {shown}")
    names: list[str] | None = None
    rows: list[dict[str, Any]] = []
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except (OSError, ValueError):
        raise invalid from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            complete = raw.endswith(b"\n")
            line = _decode(raw).rstrip("\n").rstrip("\r")
            if names is None:
                if not line.strip(" \t") or line.startswith("\\"):
                    continue
                names = [n.strip() for n in line.split("|")[1:-1]]
                if len(names) != len(FITS_TBL_COLUMNS) or set(names) != set(FITS_TBL_COLUMNS):
                    raise invalid
                continue
            if not line.strip() or line[:1] in ("\\", "|"):
                continue
            tokens = line.split()
            try:
                if len(tokens) != len(names):
                    raise ValueError
                values = {n: _fits_value(n, t) for n, t in zip(names, tokens)}
            except ValueError:
                if not complete:
                    break
                raise TableError(f"Malformed row {lineno} in fits table: {shown}") from None
            rows.append({n: values[n] for n in FITS_TBL_COLUMNS})
    if names is None:
        raise invalid
    return rows
