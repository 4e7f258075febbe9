"""``python -m cti_bridge``: the same as the ``cti-bridge`` command."""

import sys

from cti_bridge.cli import main

sys.exit(main())
