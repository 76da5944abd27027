"""Placement of images on the template pixel grid and their overlap window.

Montage's mDiff assumes every projected image lies on the template's pixel grid and
differs from it only by an integer shift: image ``k`` starts at template column
``int(TC1 - crpix1_k)`` (C truncation toward zero, not floor). This module reproduces
that arithmetic, including Montage's clamp of the exclusive window end to
``naxis - 1`` (which drops the template's last column and row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GridGeometry:
    """Pixel-grid description of an image or of the template.

    Parameters
    ----------
    naxis1, naxis2 : int
        Image size in columns and rows.
    crpix1, crpix2 : float
        Reference pixel (FITS, 1-based) of the common projection.
    """

    naxis1: int
    naxis2: int
    crpix1: float
    crpix2: float


@dataclass(frozen=True)
class Window:
    """Overlap of two images, in 0-based template indices ``[i0, i1) x [j0, j1)``.

    ``offset1``/``offset2`` are each image's ``(column, row)`` offset on the template
    grid, so the window in image ``k`` is ``[i0 - ox_k, i1 - ox_k)`` (likewise rows).
    """

    i0: int
    i1: int
    j0: int
    j1: int
    offset1: tuple[int, int]
    offset2: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """Window shape as ``(rows, columns)``."""
        return (self.j1 - self.j0, self.i1 - self.i0)

    def image_slices(self, which: int) -> tuple[slice, slice]:
        """Row and column slices of the window inside image ``which`` (1 or 2)."""
        ox, oy = self.offset1 if which == 1 else self.offset2
        return (slice(self.j0 - oy, self.j1 - oy), slice(self.i0 - ox, self.i1 - ox))


def truncate(value: float) -> int:
    """C ``(int)`` conversion of a double: truncation toward zero."""
    return int(math.trunc(value))


def grid_offset(template: GridGeometry, image: GridGeometry) -> tuple[int, int]:
    """Integer ``(column, row)`` offset of ``image`` pixel (0, 0) on the template grid."""
    return (truncate(template.crpix1 - image.crpix1), truncate(template.crpix2 - image.crpix2))


def overlap_window(
    template: GridGeometry, image1: GridGeometry, image2: GridGeometry
) -> Window | None:
    """Overlap window of two images on the template grid, as Montage's mDiff computes it.

    Parameters
    ----------
    template, image1, image2 : GridGeometry
        Geometry of the template and of the two images.

    Returns
    -------
    Window or None
        ``None`` when the images do not overlap ("Images don't overlap").
    """
    ox1, oy1 = grid_offset(template, image1)
    ox2, oy2 = grid_offset(template, image2)
    i0 = max(ox1, ox2, 0)
    j0 = max(oy1, oy2, 0)
    i1 = min(ox1 + image1.naxis1, ox2 + image2.naxis1, template.naxis1 - 1)
    j1 = min(oy1 + image1.naxis2, oy2 + image2.naxis2, template.naxis2 - 1)
    if i1 - i0 <= 0 or j1 - j0 <= 0:
        return None
    return Window(i0, i1, j0, j1, (ox1, oy1), (ox2, oy2))
