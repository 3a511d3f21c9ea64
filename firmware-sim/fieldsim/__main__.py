"""`python -m fieldsim`: the fleet launcher without the millrace CLI."""

import sys

from fieldsim.cli import main

sys.exit(main())
