"""`python -m hafa ...` (and `torchrun -m hafa train ...`)."""

import sys

from hafa.cli import main

sys.exit(main())
