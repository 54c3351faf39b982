"""``python -m bridge`` — same as the ``policy-bridge`` console script."""

import sys

from bridge.cli import main

sys.exit(main())
