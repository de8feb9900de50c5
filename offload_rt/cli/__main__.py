"""`python -m offload_rt.cli`: the `offload-rt` command."""

import sys

from offload_rt.cli import main

sys.exit(main())
