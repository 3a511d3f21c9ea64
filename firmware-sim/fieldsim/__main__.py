"""`python -m millrace.fieldsim`: the fleet launcher without the millrace CLI."""

import sys

from millrace.fieldsim.cli import main

sys.exit(main())
