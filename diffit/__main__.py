"""``python -m diffit`` runs the ``diffit`` command line."""
import sys

from diffit.cli import main

sys.exit(main())
