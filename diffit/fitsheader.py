"""A small, strict FITS header card parser for the common case.

astropy's header parser costs about a millisecond per file (and importing
``astropy.io.fits`` about half a second per process), while diffit needs only a dozen
keywords of each image. This module parses standard-conforming cards -- an upper-case
keyword, the ``"= "`` value indicator in columns 9-10, and a string, logical, integer
or real value with an optional comment -- into a plain ``dict``, giving the same values
astropy gives for them (the first occurrence of a keyword wins, string values lose
trailing blanks, ``D`` exponents are read as ``E``). The few strings that astropy
reads differently from the standard (a doubled quote before a blank or ``/``, an empty
string followed by a comment with a quote) are left to astropy.

Anything else -- lower-case or odd keywords, ``HIERARCH`` and ``CONTINUE`` cards,
complex or undefined values, non-ASCII bytes, a header without ``END`` -- raises
:class:`NotSimple`, and the caller falls back to astropy, which then decides (and words
any error). So this parser never has to reproduce astropy's handling of odd headers; it
only has to agree with astropy on the headers it accepts.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

CARD_LENGTH = 80
BLOCK_LENGTH = 2880

#: Commentary keywords, whose cards carry no value.
_COMMENTARY = frozenset({"", "COMMENT", "HISTORY"})
_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}\Z")
#: A value field: blanks, then a string (quotes doubled inside), T or F, an integer or a
#: real (``E`` or ``D`` exponent), then blanks and an optional ``/`` comment.
_VALUE = re.compile(
    r" *(?:'((?:[^']|'')*)'|([TF])|([+-]?\d+)|([+-]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][+-]?\d+)?))"
    r" *(?:/.*)?\Z"
)
_PRINTABLE = re.compile(r"[ -~]*\Z")


class NotSimple(ValueError):
    """A header (or card) outside what this parser handles; use astropy instead."""


def parse_value(field: str) -> str | bool | int | float:
    """The value of a card's value field (columns 11-80), as astropy reads it.

    Raises
    ------
    NotSimple
        The value is undefined, complex or not in a standard form.
    """
    match = _VALUE.match(field)
    if match is None:
        raise NotSimple(f"value {field.strip()!r} is not a plain string, logical or number")
    string, logical, integer, real = match.groups()
    if string is not None:
        if "' " in string or "'/" in string or (not string and field.count("'") > 2):
            # astropy ends a string at the first quote after its first character that is
            # followed by a blank, "/" or the end, even one of a doubled pair, so it reads
            # '''/' as "'" (the standard: "'/") and '' / it's' as "' / it"
            raise NotSimple("string value that astropy reads differently")
        return string.replace("''", "'").rstrip(" ")
    if logical is not None:
        return logical == "T"
    if integer is not None:
        return int(integer)
    return float(real.replace("D", "E").replace("d", "e"))


def parse_card(card: str) -> tuple[str, object] | None:
    """``(keyword, value)`` of a valued card, ``None`` for a commentary card.

    Parameters
    ----------
    card : str
        Up to 80 characters (shorter cards are padded with blanks, as in a template).

    Raises
    ------
    NotSimple
        The card is not a plain standard card.
    """
    if len(card) > CARD_LENGTH or not _PRINTABLE.match(card):
        raise NotSimple("card longer than 80 characters or not printable ASCII")
    return _parse_printable(card.ljust(CARD_LENGTH))


def _parse_printable(card: str) -> tuple[str, object] | None:
    """:func:`parse_card` of an 80-character card already known to be printable ASCII."""
    keyword = card[:8].rstrip(" ")
    if keyword in _COMMENTARY:
        if card[8:10] == "= ":
            raise NotSimple("commentary keyword with a value")
        return None
    if not _KEYWORD.match(keyword) or keyword in ("END", "CONTINUE", "HIERARCH"):
        raise NotSimple(f"keyword {keyword!r}")
    if card[8] != "=":
        raise NotSimple(f"{keyword} has no value indicator")
    # "KEYWORD =value" (no blank after the "=") breaks the standard, but CFITSIO reads
    # the value for Montage, and so does this parser
    return keyword, parse_value(card[9:])


class HeaderValues(dict):
    """Keyword values (the first occurrence of each, as astropy reads them) that also keep
    the text of each keyword's last card (CFITSIO reads some keywords, such as CRPIXn,
    BSCALE and BZERO, from their last card, and converts the card's text itself)."""

    def __init__(self, first: dict[str, object], last_cards: dict[str, str]) -> None:
        super().__init__(first)
        self._last_cards = last_cards

    def last_card(self, key: str) -> str | None:
        """The 80-character text of the last card of ``key`` (None when there is none)."""
        return self._last_cards.get(key)


def _header_values(cards: Iterable[str], parse) -> HeaderValues:
    values: dict[str, object] = {}
    last_cards: dict[str, str] = {}
    for card in cards:
        item = parse(card)
        if item is not None:
            values.setdefault(item[0], item[1])
            last_cards[item[0]] = card.ljust(CARD_LENGTH)
    return HeaderValues(values, last_cards)


# ---------------------------------------------------------------------------------------
# CFITSIO's own reading of a card's value, for the keywords Montage reads through it
# ---------------------------------------------------------------------------------------

_STRTOD = re.compile(r"[ \t\n\v\f\r]*([+-]?(\d+\.?\d*|\.\d+))([eE][+-]?\d+)?")
_STRTOD_SPECIAL = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:inf|nan)", re.IGNORECASE)
_SMALLEST_NORMAL = 2.2250738585072014e-308


def cfitsio_value_text(card: str) -> str:
    """The value string CFITSIO takes from a card (``ffpsvc``): a quoted string with its
    quotes, else the token up to a blank or ``/``; empty for an undefined value."""
    card = card[:CARD_LENGTH]
    if card[8:10] == "= ":
        position = 10
    else:
        position = card.find("=")
        if position < 0:
            return ""
        position += 1
    rest = card[position:].lstrip(" ")
    if not rest or rest[0] == "/":
        return ""
    if rest[0] == "'":
        k = 1
        while k < len(rest):
            if rest[k] == "'":
                if rest[k + 1:k + 2] == "'":
                    k += 2
                    continue
                return rest[:k + 1]
            k += 1
        return rest + "'"  # no closing quote: CFITSIO closes it
    if rest[0] == "(":
        end = rest.find(")")
        return rest if end < 0 else rest[:end + 1]
    return re.match(r"[^ /]*", rest).group()


def cfitsio_c2dd(text: str) -> float:
    """A string converted to a double as CFITSIO's ``ffc2dd`` does (strtod, the first
    ``D`` read as ``E``, nothing but a blank after the number; overflow, underflow, NaN
    and infinity are errors).

    Raises
    ------
    ValueError
        Where CFITSIO reports an error.
    """
    text = text.replace("D", "E", 1)
    if _STRTOD_SPECIAL.match(text):
        raise ValueError(f"{text!r} is not a finite number")
    match = _STRTOD.match(text)
    end = match.end() if match else 0  # strtod converts nothing: its end is the start
    if end < len(text) and text[end] != " ":
        raise ValueError(f"{text!r} is not a number")
    if match is None:
        return 0.0
    value = float(match.group(0))
    if math.isinf(value) or (abs(value) < _SMALLEST_NORMAL and re.search("[1-9]", match.group(1))):
        raise ValueError(f"{text!r} is out of range")  # strtod's ERANGE
    return value


def cfitsio_c2d(value: str) -> float:
    """A card's value string converted to a double as CFITSIO's ``ffc2d`` does: a
    quoted string through :func:`cfitsio_c2dd`, a logical as 1 or 0.

    Raises
    ------
    ValueError
        Where CFITSIO reports an error (an undefined or complex value, a string that is
        not a number).
    """
    if not value:
        raise ValueError("undefined value")
    if value[0] == "'":
        return cfitsio_c2dd(value[1:-1].replace("''", "'"))
    if value[0] in "TF":
        return 1.0 if value[0] == "T" else 0.0
    if value[0] == "(":
        raise ValueError(f"{value!r} is a complex value")
    return cfitsio_c2dd(value)


def parse_cards(cards: Iterable[str]) -> dict[str, object]:
    """Keyword values of a sequence of cards (the first occurrence of a keyword wins).

    Raises
    ------
    NotSimple
        A card is not a plain standard card.
    """
    return _header_values(cards, parse_card)


def read_header(stream, max_blocks: int = 100) -> tuple[dict[str, object], int]:
    """Parse the first header of a FITS file.

    Parameters
    ----------
    stream : binary file
        Positioned at the start of the file.
    max_blocks : int, optional
        Give up (``NotSimple``) after this many 2880-byte blocks without ``END``.

    Returns
    -------
    values : dict
        Keyword values.
    data_offset : int
        Byte offset of the data that follow the header.

    Raises
    ------
    NotSimple
        The header is not plain: no ``SIMPLE = T`` first card, no ``END``, a card this
        parser does not handle, or a short read.
    """
    cards: list[str] = []
    for block_number in range(max_blocks):
        block = stream.read(BLOCK_LENGTH)
        if len(block) != BLOCK_LENGTH:
            raise NotSimple("the header ends before its END card")
        try:
            text = block.decode("ascii")
        except UnicodeDecodeError:
            raise NotSimple("non-ASCII header bytes") from None
        for start in range(0, BLOCK_LENGTH, CARD_LENGTH):
            card = text[start:start + CARD_LENGTH]
            if card.startswith("END"):
                if card.rstrip(" ") != "END":
                    raise NotSimple("odd END card")
                # SIMPLE = F (a file that does not claim to conform) is read as CFITSIO
                # reads it for Montage: like any other
                if not cards or not re.match(r"SIMPLE  =\s+[TF](?:\s|/|\Z)", cards[0]):
                    raise NotSimple("the first card is not SIMPLE = T or F")
                if not _PRINTABLE.match("".join(cards)):
                    raise NotSimple("header cards that are not printable ASCII")
                values = _header_values(cards[1:], _parse_printable)
                return values, (block_number + 1) * BLOCK_LENGTH
            cards.append(card)
    raise NotSimple(f"no END card in the first {max_blocks} header blocks")
