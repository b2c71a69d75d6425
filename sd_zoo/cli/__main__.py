"""``python -m sd_zoo.cli``: the ``sd-zoo`` command."""
import sys

from . import main

sys.exit(main())
