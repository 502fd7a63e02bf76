"""``python -m monatune``: the same as the ``monatune`` command."""
import sys

from .cli import main

sys.exit(main())
