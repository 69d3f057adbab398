"""``python -m largessl`` = the ``largessl`` command."""

import sys

from largessl.cli import main

sys.exit(main())
