"""``python -m fedgov`` = the ``fedgov`` command."""

import sys

from fedgov_cli.main import main

sys.exit(main())
