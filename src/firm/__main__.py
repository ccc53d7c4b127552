"""``python -m firm``: the command line (this form is what ``torchrun -m firm`` runs)."""
import sys

from .cli import main

sys.exit(main())
