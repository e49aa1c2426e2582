"""`python -m lit_restore`: the `lit-restore` command line."""

import sys

from lit_restore.cli import main

sys.exit(main())
