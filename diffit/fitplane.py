"""Iterative plane fit with outlier rejection, as Montage's mFitplane does it.

(Kernel under construction; the result type is final.)
"""
from __future__ import annotations

from dataclasses import dataclass


class FitError(Exception):
    """A fit that Montage would report as failed (e.g. ``Too few pixels to fit``)."""


@dataclass(frozen=True)
class PlaneFit:
    """One plane fit ``z = a*x + b*y + c`` to a difference image: one fits.tbl row.

    Coordinates follow Montage: ``x = i - crpix1`` for 0-based column ``i``.
    ``xmin``..``ymax`` are the untruncated doubles (fits.tbl truncates them toward zero).
    """

    a: float
    b: float
    c: float
    crpix1: float
    crpix2: float
    xmin: float
    xmax: float
    ymin: float
    ymax: float
    xcenter: float
    ycenter: float
    npixel: int
    rms: float
    boxx: float
    boxy: float
    boxwidth: float
    boxheight: float
    boxang: float
