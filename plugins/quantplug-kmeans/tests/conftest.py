"""Test settings: no progress bars, one thread (the machine is shared)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
torch.set_num_threads(1)
