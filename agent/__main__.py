"""`python -m agent` runs the nodeagent command."""

import sys

from .cli import main

sys.exit(main())
