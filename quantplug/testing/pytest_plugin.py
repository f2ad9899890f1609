"""Opt-in pytest plugin for plugin authors: ``pytest_plugins = ["quantplug.testing.pytest_plugin"]``.

Fixtures:

* ``quantplug_session``: a Session with built-ins and the installed entry points (your plugin).
* ``isolated_session``: built-ins only, nothing that happens to be installed.
* ``tiny_resnet`` / ``tiny_decoder``: the tiny models, seeded.
"""

from __future__ import annotations

import pytest
from torch import nn

from quantplug.plugins import Session
from quantplug.testing import models


@pytest.fixture
def quantplug_session() -> Session:
    return Session(entry_points=True)


@pytest.fixture
def isolated_session() -> Session:
    return Session(entry_points=False)


@pytest.fixture
def tiny_resnet() -> nn.Module:
    return models.tiny_resnet(0).eval()


@pytest.fixture
def tiny_decoder() -> nn.Module:
    return models.tiny_decoder(0).eval()
