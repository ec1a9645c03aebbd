"""``python -m autoselect_fast`` is the ``autoselect-fast`` command."""
import sys

from .cli import main

sys.exit(main())
