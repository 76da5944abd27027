"""Tests for diffit.tables: mtbl-exact overlap-table reading, fits.tbl formatting.

Montage parity tests run MontagePy in a helper subprocess: every MontagePy
``mDiffFitExec`` call leaks ~64 MB (mtbl allocates its column table and never
frees it), and its C-level debug output has to be captured at fd level.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffit.fitplane import PlaneFit
from diffit.tables import (
    FITS_TBL_COLUMNS,
    FITS_TBL_HEADER,
    OverlapPair,
    TableError,
    c_atoi,
    format_fit_row,
    format_overlap_table,
    iter_overlap_table,
    read_fits_table,
    read_overlap_table,
)

INVALID = "Invalid diffs metadata file: "
NEED = "Need columns: cntr1 cntr2 plus minus diff"

# --------------------------------------------------------------------------
# MontagePy oracle (subprocess worker)
# --------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import ctypes, json, os, sys
    proto = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    import MontagePy.main as m
    libc = ctypes.CDLL(None)
    for line in sys.stdin:
        req = json.loads(line)
        cap = req.get("capture")
        if cap:
            fd = os.open(cap, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.close(fd)
        try:
            res = getattr(m, req["fn"])(*req["args"], **req["kwargs"])
        finally:
            libc.fflush(None)
            os.dup2(null, 1)
        res = {k: (v.decode("latin-1") if isinstance(v, bytes) else v)
               for k, v in res.items()}
        proto.write(json.dumps(res) + "\\n")
        proto.flush()
    """
)


class _Montage:
    """A MontagePy subprocess that is restarted every few table reads."""

    MAX_CALLS = 10

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.calls = 0
        self.serial = 0

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.calls >= self.MAX_CALLS or self.proc.poll() is not None:
            self.close()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=self.workdir,
                text=True,
            )
            self.calls = 0
        return self.proc

    def call(self, fn: str, *args: object, capture: bool = False, **kwargs: object):
        proc = self._start()
        self.calls += 1
        self.serial += 1
        cap = str(self.workdir / f"out{self.serial}.txt") if capture else None
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"fn": fn, "args": args, "kwargs": kwargs, "capture": cap}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            rc = proc.wait()
            self.proc = None
            raise RuntimeError(f"MontagePy worker died (rc {rc})")
        res = json.loads(line)
        if capture:
            assert cap is not None
            out = Path(cap).read_bytes()
            os.unlink(cap)
            return res, out
        return res

    def read_table(self, tbl: Path | str) -> tuple[dict, bytes]:
        """Run mDiffFitExec on a table whose rows point at nothing.

        path 'P', diffdir 'D' and template 'T' do not exist in the worker's
        directory, so every record fails in mDiff (nothing is written, and with
        keepAll nothing is deleted); the debug output shows the parsed names.
        """
        return self.call(
            "mDiffFitExec", "P", str(tbl), "T", "D", str(self.workdir / "fits.tbl"),
            keepAll=True, noAreas=True, debug=1, capture=True,
        )

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None


@pytest.fixture(scope="session")
def montage(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("MontagePy")
    worker = _Montage(tmp_path_factory.mktemp("montage_worker"))
    yield worker
    worker.close()


def _file_path(directory: bytes, name: bytes) -> bytes:
    """Montage's montage_filePath(), for predicting the debug output."""
    if name[:1] == b"/":
        return name
    if name[:2] == b"./":
        name = name[2:]
    return directory + b"/" + name


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _ours(path: Path | str) -> tuple[str, list[OverlapPair] | None]:
    try:
        return "", read_overlap_table(path)
    except TableError as exc:
        return str(exc), None


def assert_parity(montage: _Montage, path: Path | str) -> list[OverlapPair] | None:
    """Compare our reading of ``path`` with MontagePy's: message or records."""
    msg, pairs = _ours(path)
    res, out = montage.read_table(path)
    if pairs is None:
        assert res == {"status": "1", "msg": msg}
        return None
    assert res["status"] == "0", res
    assert res["count"] == len(pairs)
    parts = (b"\n" + out).split(b"\nmDiff(")[1:]
    assert len(parts) == len(pairs)
    for part, p in zip(parts, pairs):
        diff = _enc(p.diff)
        if not diff.endswith(b"s"):
            diff += b"s"
        expect = b", ".join(
            [_file_path(b"P", _enc(p.plus)), _file_path(b"P", _enc(p.minus)), _file_path(b"D", diff)]
        ) + b") -> ["
        assert part.startswith(expect), (part, expect)
    return pairs


# --------------------------------------------------------------------------
# awkward tables (explicit expectations + MontagePy parity)
# --------------------------------------------------------------------------

STD_HDR = b"| cntr1 | cntr2 |      plus |     minus |         diff             |\n"
STD_TYP = b"| int   | int   |      char |      char |         char             |\n"


def _row(c1: int, c2: int, plus: str, minus: str, width: int = 10) -> bytes:
    return (
        f"{c1:8d}{c2:8d} {plus:>{width}}  {minus:>{width}}  diff.{c1:06d}.{c2:06d}.fits\n"
    ).encode()


R01 = _row(0, 1, "a.fits", "b.fits")
R12 = _row(1, 2, "b.fits", "c.fits")

# name -> (content, expected message or list of (cntr1, cntr2, plus, minus, diff))
CASES: dict[str, tuple[bytes, object]] = {
    "standard": (STD_HDR + STD_TYP + R01 + R12, [
        (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits"),
        (1, 2, "b.fits", "c.fits", "diff.000001.000002.fits"),
    ]),
    "keywords_and_blank_lines_before_header": (
        b"\\fixlen = T\n\\ a comment\n\n  \t \n\\x=|a|b|\n" + STD_HDR + STD_TYP + R01, [
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits")]),
    "comment_and_bar_lines_among_data": (
        STD_HDR + STD_TYP + R01 + b"\\ comment\n|  | junk |\n" + R12, [
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits"),
            (1, 2, "b.fits", "c.fits", "diff.000001.000002.fits")]),
    "header_without_leading_bar": (
        b"  cntr1 | cntr2 |      plus |     minus |         diff             |\n" + R01, [
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits")]),
    "type_unit_null_and_more_bar_lines": (
        STD_HDR + STD_TYP + b"|  |  |  u |  u  |   u |\n|null| null | x | x | x|\n|extra|\n" + R01, [
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits")]),
    "blank_lines_are_records": (
        STD_HDR + STD_TYP + b"\n" + R01 + b"   \t  \n\r\n", [
            (0, 0, "", "", ""),
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits"),
            (0, 0, "", "", ""),
            (0, 0, "", "", "")]),
    "crlf": (
        (STD_HDR + STD_TYP + R01 + R12).replace(b"\n", b"\r\n"), [
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits"),
            (1, 2, "b.fits", "c.fits", "diff.000001.000002.fits")]),
    "misaligned_row_loses_char_under_bar": (
        b"| cntr1 | cntr2 | plus | minus | diff |\n"
        b"       0       1  a.fits  b.fits  diff.000000.000001.fits\n"
        b"0 1 a b c\n", [
            (0, 1, "a.fit", "b.fit", "diff"),
            (0, 0, "", "", "")]),
    "misaligned_diff_start_under_bar": (
        b"| cntr1 | cntr2 |  plus  | minus  |         diff             |\n"
        b"       0       1   a.fits   b.fitsdiff.000000.000001.fits\n", [
            (0, 1, "a.fits", "b.fits", "iff.000000.000001.fits")]),
    "extra_columns_and_permuted_order": (
        b"|  diff                   | ra |  minus  | x |   plus  |cntr2|cntr1|\n"
        b" diff.000003.000004.fits   1.5    b.fits  7    a.fits     4     3 \n", [
            (3, 4, "a.fits", "b.fits", "diff.000003.000004.fits")]),
    "duplicate_column_first_wins": (
        b"|cntr1|cntr2| plus |minus | diff |plus |\n"
        b"    1     2  a.fit  b.fit  d.fit  zzzz \n", [
            (1, 2, "a.fit", "b.fit", "d.fit")]),
    "atoi_semantics": (
        b"| cntr1  | cntr2    |plus|minus|diff|\n"
        b" +12abc    -7.9      x    y     z\n"
        b" abc      9999999999\n"
        b"\t 5       -0\n", [
            (12, -7, "x", "y", "z"),
            (0, 1410065407, "", "", ""),
            (5, 0, "", "", "")]),
    "missing_column": (b"| cntr1 | cntr2 | plus | minus | dif |\n 0 1 a b c\n", NEED),
    "tab_in_column_name": (b"|cntr1|cntr2|plus|minus|\tdiff|\n", NEED),
    "backslash_ends_header": (b"|cntr1|cntr2|plus|minus\\|diff|\n", NEED),
    "text_after_last_bar_is_not_a_column": (b"|cntr1|cntr2|plus|minus| diff\n", NEED),
    "header_only": (STD_HDR + STD_TYP, []),
    "last_line_without_newline": (STD_HDR + R01[:-1], [
        (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits")]),
    "empty_file": (b"", INVALID),
    "only_comments_and_blanks": (b"\\a = 1\n\n \t\n\\ x | y |\n", INVALID),
    "no_bar_in_header": (b"cntr1 cntr2 plus minus diff\n0 1 a b c\n", INVALID),
    "cr_only_line_ends_make_one_line": ((STD_HDR + R01).replace(b"\n", b"\r"), []),
    "non_utf8_names": (
        STD_HDR + b"       0       1     \xe9.fits      \xff.fits  d\xe9.fits\n", [
            (0, 1, "\udce9.fits", "\udcff.fits", "d\udce9.fits")]),
    "nul_in_data_line": (
        STD_HDR + b"       0       1    a\0.fits      b.fits  diff\0x\n" + R12, None),
    "nul_in_header_line_shifts_data_start": (
        b"|cntr1|cntr2|plus|minus|diff|\0  zz|\n|t|t|t|t|t|\n" + b" 1  2   ab   cd   ef\n", None),
    "nul_in_type_line_shifts_data_start": (
        STD_HDR + b"| int | int |\0 zz    1     2  \n" + R01 + R12, None),
    "nul_in_keyword_line": (b"\\ key\0  |a|b|\n" + STD_HDR + R01, None),
    "skipped_line_residue_reaches_fields": (
        b"cntr1|plus|cntr2|minus|diff| trailing\n\n|     \n\n", [
            (0, 0, "", "", ""), (0, 0, "\n", "", "")]),
    "skipped_comment_residue_in_blank_and_short_rows": (
        STD_HDR + STD_TYP + R01
        + b"\\  12345 this comment is long   cc.fits    xx.fits zzzz  qqqqqqqqqq  rrrrrr\n"
        + b"\n|" + b" " * 30 + b"pp|  mm  ii\n" + b"  7\n" + R12 + b"\\ short\n" + R12, None),
    "nul_starting_lines": (STD_HDR + b"\0     1  x\n" + R01 + b"\0\n", None),
    "long_data_line_is_split": (
        STD_HDR + R01[:-1] + b" " * 4000 + b"1  2  3  4  5  6  7  8  9  10  11  12  13\n" + R12, None),
    "line_of_exactly_4095_bytes_gives_blank_record": (
        STD_HDR + R01[:-1] + b" " * (4095 - len(R01) + 1) + b"\n" + R12, [
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits"),
            (0, 0, "", "", ""),
            (1, 2, "b.fits", "c.fits", "diff.000001.000002.fits")]),
    "long_header_line_remainder_is_data": (
        STD_HDR[:-1] + b" " * 4100 + b"| x |\n" + R01, None),
    "long_keyword_line_remainder_becomes_header": (
        b"\\" + b"k" * 4094 + STD_HDR + R01, [
            (0, 1, "a.fits", "b.fits", "diff.000000.000001.fits")]),
    "empty_column_names": (b"||cntr1|cntr2|plus|minus|diff|\nzz 1     2     a    b     c\n", [
        (1, 2, "a", "b", "c")]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_awkward_tables(name: str, tmp_path: Path, montage: _Montage) -> None:
    content, expected = CASES[name]
    path = tmp_path / "diffs.tbl"
    path.write_bytes(content)
    msg, pairs = _ours(path)
    if isinstance(expected, str):
        assert msg == (expected + str(path) if expected == INVALID else expected)
    elif expected is not None:
        assert msg == ""
        assert pairs is not None
        assert [(p.cntr1, p.cntr2, p.plus, p.minus, p.diff) for p in pairs] == expected
        assert [p.index for p in pairs] == list(range(len(pairs)))
    assert_parity(montage, path)


def test_awkward_tables_without_montage(tmp_path: Path) -> None:
    """The explicit expectations also hold when MontagePy is absent."""
    for name, (content, expected) in CASES.items():
        path = tmp_path / f"{name}.tbl"
        path.write_bytes(content)
        msg, pairs = _ours(path)
        if isinstance(expected, str):
            assert msg == (expected + str(path) if expected == INVALID else expected), name
        elif expected is not None:
            assert pairs is not None, name
            assert [(p.cntr1, p.cntr2, p.plus, p.minus, p.diff) for p in pairs] == expected, name


def test_nul_and_long_line_details(tmp_path: Path) -> None:
    path = tmp_path / "t.tbl"
    path.write_bytes(CASES["nul_in_data_line"][0])
    pairs = read_overlap_table(path)
    assert [(p.plus, p.diff) for p in pairs] == [("a", "diff"), ("b.fits", "diff.000001.000002.fits")]
    path.write_bytes(CASES["long_data_line_is_split"][0])
    pairs = read_overlap_table(path)
    assert len(pairs) == 3
    assert (pairs[0].plus, pairs[2].plus) == ("a.fits", "b.fits")


def test_missing_file_and_directory(tmp_path: Path, montage: _Montage) -> None:
    missing = tmp_path / "nope.tbl"
    with pytest.raises(TableError) as err:
        read_overlap_table(missing)
    assert str(err.value) == INVALID + str(missing)
    assert_parity(montage, missing)
    assert_parity(montage, tmp_path)
    # the path is reported as given (relative, PathLike)
    with pytest.raises(TableError, match="^Invalid diffs metadata file: no/such/file.tbl$"):
        read_overlap_table(Path("no/such/file.tbl"))
    with pytest.raises(TableError):
        read_overlap_table("nul\0in path")


def test_fits_file_and_binary_garbage(tmp_path: Path, montage: _Montage) -> None:
    from astropy.io import fits

    fitsfile = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(fitsfile)
    with pytest.raises(TableError, match="^Invalid diffs metadata file: "):
        read_overlap_table(fitsfile)
    assert_parity(montage, fitsfile)
    rng = random.Random(1234)
    for k in range(3):
        garbage = tmp_path / f"garbage{k}.bin"
        data = bytes(rng.randrange(256) for _ in range(3000))
        if k == 2:  # garbage after a valid header
            data = STD_HDR + data
        garbage.write_bytes(data)
        assert_parity(montage, garbage)


# --------------------------------------------------------------------------
# random tables: hypothesis, with MontagePy as the oracle
# --------------------------------------------------------------------------

_TEXT = b" abcxyz.019-+|\\\t\r"
_COLS = [b"cntr1", b"cntr2", b"plus", b"minus", b"diff"]


@st.composite
def random_tables(draw: st.DrawFn) -> bytes:
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        lines.append(draw(st.sampled_from([b"", b"  ", b"\t", b"\\ c", b"\\k = v", b" \t "])))
    cols = list(_COLS)
    if draw(st.integers(0, 9)) == 0:
        cols.remove(draw(st.sampled_from(_COLS)))
    cols += draw(st.lists(st.sampled_from([b"ra", b"x", b"cntr", b"Diff"]), max_size=2))
    cols = draw(st.permutations(cols))
    header = b"|" if draw(st.booleans()) else b""
    widths = []
    for name in cols:
        left = draw(st.integers(0, 4))
        right = draw(st.integers(0, 4))
        header += b" " * left + name + b" " * right + b"|"
        widths.append(left + len(name) + right)
    if draw(st.integers(0, 4)) == 0:
        header += b" trailing"
    lines.append(header)
    for _ in range(draw(st.integers(0, 3))):
        lines.append(b"|" + draw(st.binary(max_size=20).map(lambda b: bytes(c % 94 + 32 for c in b))))
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines.append(draw(st.sampled_from([b"", b"   ", b"\t", b"\\ x", b"| y |"])))
        elif kind == 1:  # free text
            n = draw(st.integers(0, 60))
            lines.append(bytes(draw(st.lists(st.sampled_from(_TEXT), min_size=n, max_size=n))))
        else:  # values roughly aligned to the columns, jittered
            row = b""
            for name, w in zip(cols, widths):
                val = {b"cntr1": b"12", b"cntr2": b"-3", b"plus": b"p.fits",
                       b"minus": b"m.fits", b"diff": b"d.fit"}.get(name, b"7")
                row += val.rjust(w + draw(st.integers(-1, 1)))[: w + 1]
            lines.append(row)
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    text = eol.join(lines)
    if draw(st.booleans()):
        text += eol
    return text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=random_tables())
def test_random_tables_match_montage(content: bytes, montage: _Montage, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.getbasetemp() / "random.tbl"
    path.write_bytes(content)
    assert_parity(montage, path)


@settings(max_examples=300, deadline=None)
@given(content=st.one_of(random_tables(), st.binary(max_size=600),
                         st.binary(max_size=200).map(lambda b: STD_HDR + b)))
def test_random_input_only_raises_table_error(content: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.tbl"
    path.write_bytes(content)
    try:
        pairs = read_overlap_table(path)
    except TableError as exc:
        assert str(exc) in (INVALID + str(path), NEED)
        return
    assert [p.index for p in pairs] == list(range(len(pairs)))
    for p in pairs:
        assert -(2**31) <= p.cntr1 < 2**31 and -(2**31) <= p.cntr2 < 2**31
        for name in (p.plus, p.minus, p.diff):
            # (trailing spaces can survive when residue of a skipped line follows)
            assert "\0" not in name and not name.startswith(" ")


# --------------------------------------------------------------------------
# writer round trip and streaming
# --------------------------------------------------------------------------

_NAME = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x17F, exclude_characters="|\\"),
    min_size=1, max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(-9999999, 99999999), st.integers(-999999, 9999999),
                               _NAME, _NAME, st.text(alphabet="abcdef.0123456789_", min_size=1, max_size=26)),
                     max_size=8),
       extra=st.integers(0, 3))
def test_overlap_table_round_trip(rows, extra: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    namelen = max([5] + [len(_enc(n)) for r in rows for n in (r[2], r[3])]) + extra
    text = format_overlap_table(rows, namelen=namelen)
    path = tmp_path_factory.getbasetemp() / "rt.tbl"
    path.write_bytes(_enc(text))
    got = read_overlap_table(path)
    assert [(p.cntr1, p.cntr2, p.plus, p.minus, p.diff) for p in got] == [tuple(r) for r in rows]


def test_format_overlap_table_layout(tmp_path: Path, montage: _Montage) -> None:
    rows = [(0, 1, "p3.fits", "p2.fits", "diff.000000.000001.fits"),
            (1, 2, "p2.fits", "longer_name.fits", "diff.000001.000002.fits")]
    text = format_overlap_table(rows)
    assert text.splitlines(keepends=True) == [
        "| cntr1 | cntr2 |            plus |           minus |         diff             |\n",
        "| int   | int   |            char |            char |         char             |\n",
        "       0       1          p3.fits           p2.fits  diff.000000.000001.fits\n",
        "       1       2          p2.fits  longer_name.fits  diff.000001.000002.fits\n",
    ]
    assert format_overlap_table([]) == (
        "| cntr1 | cntr2 |plus |minus |         diff             |\n"
        "| int   | int   |char |char |         char             |\n")
    # byte-width padding for non-ASCII names, as printf does
    assert format_overlap_table([(0, 1, "é.fits", "abcdefg", "d")], namelen=8).splitlines()[2] == (
        "       0       1  é.fits   abcdefg  d")
    path = tmp_path / "t.tbl"
    path.write_text(text)
    assert [(p.cntr1, p.cntr2, p.plus, p.minus, p.diff) for p in assert_parity(montage, path) or []] == rows
    # mOverlaps quirk: names shorter than "minus" shift the header; still parity
    path.write_text(format_overlap_table([(0, 1, "a", "b", "diff.000000.000001.fits")]))
    pairs = assert_parity(montage, path)
    assert pairs is not None and pairs[0].plus != "a"


def test_iter_overlap_table_is_lazy_and_eager_about_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tbl"
    bad.write_text("| cntr1 | cntr2 |\n 1 2\n")
    with pytest.raises(TableError, match=f"^{NEED}$"):
        iter_overlap_table(bad)
    with pytest.raises(TableError, match="^Invalid diffs metadata file: "):
        iter_overlap_table(tmp_path / "missing.tbl")
    n = 200_000
    rows = ((i, i + 1, f"img{i:07d}.fits", f"img{i + 1:07d}.fits", f"diff.{i:06d}.{i + 1:06d}.fits")
            for i in range(n))
    big = tmp_path / "big.tbl"
    big.write_text(format_overlap_table(rows, namelen=16))
    it = iter_overlap_table(big)
    first = next(it)
    assert first == OverlapPair(0, 0, 1, "img0000000.fits", "img0000001.fits", "diff.000000.000001.fits")
    it.close()  # type: ignore[attr-defined]
    count = 0
    last = None
    for last in iter_overlap_table(big):
        count += 1
    assert count == n and last is not None and last.index == n - 1 and last.cntr1 == n - 1
    # never iterated: no open file left behind (filterwarnings=error catches ResourceWarning)
    iter_overlap_table(big)


# --------------------------------------------------------------------------
# C library oracles: atoi and printf
# --------------------------------------------------------------------------

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_LIBC.atoi.argtypes = [ctypes.c_char_p]
_LIBC.atoi.restype = ctypes.c_int


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=30).map(lambda b: b.replace(b"\0", b"")),
    st.builds(lambda ws, sign, digits, tail: ws + sign + digits + tail,
              st.sampled_from([b"", b" ", b"\t\n\v\f\r "]), st.sampled_from([b"", b"+", b"-"]),
              st.text(alphabet="0123456789", max_size=25).map(str.encode),
              st.sampled_from([b"", b"x", b".5", b" 3"])),
))
def test_atoi_matches_libc(raw: bytes) -> None:
    assert c_atoi(raw) == _LIBC.atoi(raw)


_ROW_FMT = (b" %9d %9d %16.5e %16.5e %16.5e %14.2f %14.2f %10d %10d %10d %10d %13.2f %13.2f "
            b"%13.0f %16.5e %16.1f %16.1f %16.1f %16.1f %16.1f \n")


def _c_row(cntr1: int, cntr2: int, fit: PlaneFit, ints: tuple[int, int, int, int]) -> str:
    buf = ctypes.create_string_buffer(4096)
    d = ctypes.c_double
    _LIBC.snprintf(
        buf, 4096, _ROW_FMT, ctypes.c_int(cntr1), ctypes.c_int(cntr2), d(fit.a), d(fit.b), d(fit.c),
        d(fit.crpix1), d(fit.crpix2), *(ctypes.c_int(v) for v in ints), d(fit.xcenter), d(fit.ycenter),
        d(float(fit.npixel)), d(fit.rms), d(fit.boxx), d(fit.boxy), d(fit.boxwidth), d(fit.boxheight),
        d(fit.boxang),
    )
    return buf.value.decode()


_NEG_NAN = math.copysign(math.nan, -1.0)
_SPECIAL = st.sampled_from([0.0, -0.0, math.nan, _NEG_NAN, math.inf, -math.inf, 1e300, -1e300,
                            5e-324, 0.5, -0.5, 2.5, 0.125, 0.005, 1e16, 123456.785, 9.999995e10])
_DOUBLE = st.one_of(_SPECIAL, st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e6, 1e6))


def _fit(values: list[float], npixel: int, bounds: list[float]) -> PlaneFit:
    a, b, c, crpix1, crpix2, xc, yc, rms, bx, by, bw, bh, ba = values
    return PlaneFit(a, b, c, crpix1, crpix2, *bounds, xc, yc, npixel, rms, bx, by, bw, bh, ba)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_DOUBLE, min_size=13, max_size=13),
       bounds=st.lists(st.floats(-2.1e9, 2.1e9), min_size=4, max_size=4),
       npixel=st.integers(-(2**31), 2**31 - 1),
       cntr=st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)))
def test_format_fit_row_matches_c_printf(values, bounds, npixel, cntr) -> None:
    fit = _fit(values, npixel, bounds)
    ints = tuple(math.trunc(v) for v in bounds)
    assert format_fit_row(*cntr, fit) == _c_row(*cntr, fit, ints)  # type: ignore[arg-type]


def test_format_fit_row_special_values() -> None:
    fit = PlaneFit(a=-0.0, b=math.nan, c=_NEG_NAN, crpix1=math.inf, crpix2=-math.inf,
                   xmin=-40.5, xmax=49.5, ymin=math.nan, ymax=1e10, xcenter=-0.001, ycenter=1e300,
                   npixel=0, rms=-math.inf, boxx=-0.04, boxy=0.05, boxwidth=0.25, boxheight=1e-300,
                   boxang=-180.0)
    row = format_fit_row(0, 1, fit)
    fields = row[1:-2].split(" ")
    fields = [f for f in fields if f]
    assert fields[2:5] == ["-0.00000e+00", "nan", "-nan"]
    assert fields[5:7] == ["inf", "-inf"]
    assert fields[7:11] == ["-40", "49", "-2147483648", "-2147483648"]  # x86-64 cvttsd2si
    assert fields[11] == "-0.00" and fields[12].startswith("1000000000000000052504760255204420248704")
    assert fields[14:] == ["-inf", "-0.0", "0.1", "0.2", "0.0", "-180.0"]
    assert row.startswith(" ") and row.endswith(" \n")
    normal = PlaneFit(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
    assert len(format_fit_row(0, 1, normal)) == 291
    # every bar of the header sits on a separating space of a normal row
    row = format_fit_row(0, 1, normal)
    assert all(row[i] == " " for i, ch in enumerate(FITS_TBL_HEADER) if ch == "|")


# --------------------------------------------------------------------------
# fits.tbl against MontagePy on real images
# --------------------------------------------------------------------------

_CARDS = {
    "SIMPLE": "T", "BITPIX": "-64", "NAXIS": "2", "NAXIS1": "120", "NAXIS2": "100",
    "CTYPE1": "'RA---TAN'", "CTYPE2": "'DEC--TAN'", "CRVAL1": "180.0", "CRVAL2": "30.0",
    "CRPIX1": "60.5", "CRPIX2": "50.5", "CDELT1": "-0.0005", "CDELT2": "0.0005",
    "CROTA2": "0.0", "EQUINOX": "2000",
}


def _make_case(root: Path) -> Path:
    from astropy.io import fits

    hdr_lines = [f"{k:<8}= {v:>20}".ljust(80) for k, v in _CARDS.items()] + ["END".ljust(80)]
    (root / "template.hdr").write_text("\n".join(hdr_lines) + "\n")
    rng = np.random.default_rng(42)
    # (x0, y0, nx, ny) of each image on the template grid (0-based), and its plane
    images = [(0, 0, 70, 60, (2.0, 0.003, -0.001)),
              (40, 30, 80, 70, (0.0, 0.0, 0.0)),
              (10, 45, 60, 55, (-1.5, 0.0, 0.002))]
    for k, (x0, y0, nx, ny, (c0, cx, cy)) in enumerate(images):
        yy, xx = np.mgrid[0:ny, 0:nx]
        data = c0 + cx * (xx + x0) + cy * (yy + y0) + rng.normal(0, 0.05, (ny, nx))
        data[rng.random((ny, nx)) < 0.01] = np.nan
        h = fits.Header()
        for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2", "CROTA2", "EQUINOX"):
            h[key] = json.loads(_CARDS[key].replace("'", '"'))
        h["CRPIX1"] = 60.5 - x0
        h["CRPIX2"] = 50.5 - y0
        fits.PrimaryHDU(data.astype(np.float64), header=h).writeto(root / f"img{k}.fits")
    rows = [(0, 1, "img0.fits", "img1.fits", "diff.000000.000001.fits"),
            (0, 2, "img0.fits", "img2.fits", "diff.000000.000002.fits"),
            (1, 2, "img1.fits", "img2.fits", "diff.000001.000002.fit")]
    (root / "diffs.tbl").write_text(format_overlap_table(rows))
    (root / "diffs").mkdir()
    return root


def test_fit_rows_match_montage(tmp_path: Path, montage: _Montage) -> None:
    root = _make_case(tmp_path)
    fitfile = root / "fits.tbl"
    res = montage.call("mDiffFitExec", str(root), str(root / "diffs.tbl"), str(root / "template.hdr"),
                       str(root / "diffs"), str(fitfile), keepAll=True, noAreas=True)
    assert res == {"status": "0", "count": 3, "diff_failed": 0, "fit_failed": 0, "warning": 0}
    montage_lines = fitfile.read_text().splitlines(keepends=True)
    assert montage_lines[0] == FITS_TBL_HEADER
    assert len(montage_lines) == 4
    parsed = read_fits_table(fitfile)
    for pair, line, rec in zip(read_overlap_table(root / "diffs.tbl"), montage_lines[1:], parsed):
        diff = pair.diff if pair.diff.endswith("s") else pair.diff + "s"
        fp = montage.call("mFitplane", str(root / "diffs" / diff), False, False, 0, 0)
        assert fp["status"] == "0", fp
        fit = PlaneFit(**{k: fp[k] for k in PlaneFit.__dataclass_fields__})
        assert format_fit_row(pair.cntr1, pair.cntr2, fit) == line
        assert rec["plus"] == pair.cntr1 and rec["minus"] == pair.cntr2
        assert rec["xmin"] == math.trunc(fp["xmin"]) and rec["npixel"] == fp["npixel"]
        assert rec["a"] == pytest.approx(fp["a"], rel=1e-5, abs=1e-300)


# --------------------------------------------------------------------------
# read_fits_table
# --------------------------------------------------------------------------

def test_read_fits_table_round_trip_and_errors(tmp_path: Path) -> None:
    fits_a = PlaneFit(-2.02697e-03, 9.55179e-04, -2.65387, 50.5, 70.5, -50.2, 28.9, -70.0, 48.0,
                      -10.9, -10.91, 8093, 5.04361e-02, -11.0, -11.0, 119.0, 79.0, 90.0)
    fits_b = PlaneFit(math.nan, _NEG_NAN, math.inf, 1e20, -0.0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -0.0)
    text = FITS_TBL_HEADER + format_fit_row(0, 1, fits_a) + format_fit_row(3, 12, fits_b)
    path = tmp_path / "fits.tbl"
    path.write_text(text)
    rows = read_fits_table(path)
    assert [list(r) for r in rows] == [list(FITS_TBL_COLUMNS)] * 2
    assert rows[0]["plus"] == 0 and rows[0]["minus"] == 1 and rows[0]["xmin"] == -50
    assert rows[0]["npixel"] == 8093 and isinstance(rows[0]["npixel"], int)
    assert rows[0]["c"] == -2.65387 and rows[0]["boxang"] == 90.0
    assert math.isnan(rows[1]["a"]) and math.copysign(1, rows[1]["b"]) == -1 and rows[1]["c"] == math.inf
    assert rows[1]["crpix1"] == 1e20 and math.copysign(1, rows[1]["boxang"]) == -1
    # an interrupted last row (no newline) is ignored; a malformed complete row is an error
    path.write_text(text + format_fit_row(5, 6, fits_a)[:100])
    assert len(read_fits_table(path)) == 2
    path.write_text(text + " 1 2 3\n")
    with pytest.raises(TableError, match="Malformed row 4"):
        read_fits_table(path)
    path.write_text("")
    with pytest.raises(TableError, match="Invalid fits table"):
        read_fits_table(path)
    path.write_text(FITS_TBL_HEADER)
    assert read_fits_table(path) == []
    with pytest.raises(TableError):
        read_fits_table(tmp_path / "missing.tbl")
