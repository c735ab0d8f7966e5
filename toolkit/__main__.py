"""``python -m toolkit`` is the ``toolkit`` command; ``torchrun --nproc-per-node N -m toolkit capture ...`` runs it on
every rank (docs/prompt-sets.md)."""

import sys

from toolkit.cli import main

sys.exit(main())
