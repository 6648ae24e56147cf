"""`python -m jpq ...` runs the command line (see jpq.cli)."""
import sys

from .cli import main

sys.exit(main())
