"""``python -m genblocks`` is the ``genblocks`` command."""

import sys

from genblocks.cli import main

sys.exit(main())
