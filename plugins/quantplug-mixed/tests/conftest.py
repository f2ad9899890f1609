"""Make the helper module ``mixed_toys`` (small models, a minimal adapter) importable from the tests."""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
