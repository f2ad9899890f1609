"""``python -m quantplug`` (and ``torchrun --nproc-per-node N -m quantplug apply ...``): the command line."""

import sys

from quantplug.cli import main

sys.exit(main())
