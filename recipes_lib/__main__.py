"""``python -m recipes_lib train ...``: the ``recipes`` command (``recipes_lib.app.cli``)."""

import sys

from recipes_lib.app.cli import main

sys.exit(main())
