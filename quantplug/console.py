"""User-facing output of CLI commands (results, paths, next steps) on standard output.

Library code reports progress and diagnostics through ``logging``; a command's *result* is what the user
asked for and goes to stdout, through this one function, so it can be piped and captured.
"""

from __future__ import annotations

import sys


def out(text: str = "", end: str = "\n") -> None:
    """Write one line of command output to standard output."""
    sys.stdout.write(f"{text}{end}")
