"""`python -m cedar.cli`: how `cedar up` starts each service as its own process."""

import sys

from cedar.cli.main import main

sys.exit(main())
