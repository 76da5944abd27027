"""diffit: a parallel, in-memory drop-in for Montage's mDiffFitExec.

For every overlapping pair of projected images it forms the difference in the overlap,
fits a plane with Montage's outlier rejection, and writes the fits.tbl that Montage's
mBgModel reads -- the same rows, character for character.
"""
try:
    from diffit import _boundingbox, _difference, _fitplane, _fitsread  # noqa: F401 - compiled kernels
except ImportError as error:  # a source checkout that was never built
    raise ImportError(
        f"diffit's compiled kernels are missing ({error}): install diffit with"
        " `pip install .` (needs a C compiler), or in place for development with"
        " `pip install -e .`"
    ) from error

from diffit.api import mDiffFitExec
from diffit.runner import Interrupted, RunError, RunResult, run

__version__ = "0.1.0"

__all__ = ["mDiffFitExec", "run", "RunResult", "RunError", "Interrupted", "__version__"]
