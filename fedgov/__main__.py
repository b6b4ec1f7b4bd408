"""``python -m fedgov`` = the ``fedgov`` command."""

import sys

from fedgov.cli import main

sys.exit(main())
