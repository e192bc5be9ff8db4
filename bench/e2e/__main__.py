"""``python -m bench.e2e``: see bench/e2e/run.py."""

import sys

from bench.e2e.run import main

sys.exit(main())
