"""``python -m benchmarks --suite quick|full [--force] [--out benchmarks/results]``."""

import sys

from benchmarks import main

sys.exit(main())
