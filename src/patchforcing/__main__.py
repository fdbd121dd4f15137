"""``python -m patchforcing`` (what ``torchrun -m patchforcing train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
