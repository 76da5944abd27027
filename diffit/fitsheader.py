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
    """Keyword values (the first occurrence of each, as astropy reads them), which also
    know the last occurrence of each keyword (CFITSIO reads indexed keywords such as
    CRPIXn by scanning the whole header, so the last one wins there)."""

    def __init__(self, first: dict[str, object], last: dict[str, object]) -> None:
        super().__init__(first)
        self._last = last

    def last(self, key: str, default: object = None) -> object:
        """The value of the last card of ``key`` (``default`` when there is none)."""
        return self._last.get(key, default)


def _first_values(parsed: Iterable[tuple[str, object] | None]) -> HeaderValues:
    values: dict[str, object] = {}
    last: dict[str, object] = {}
    for item in parsed:
        if item is not None:
            if item[0] not in values:
                values[item[0]] = item[1]
            last[item[0]] = item[1]
    return HeaderValues(values, last)


def parse_cards(cards: Iterable[str]) -> dict[str, object]:
    """Keyword values of a sequence of cards (the first occurrence of a keyword wins).

    Raises
    ------
    NotSimple
        A card is not a plain standard card.
    """
    return _first_values(parse_card(card) for card in cards)


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
                values = _first_values(_parse_printable(card) for card in cards[1:])
                return values, (block_number + 1) * BLOCK_LENGTH
            cards.append(card)
    raise NotSimple(f"no END card in the first {max_blocks} header blocks")
