"""pytest plugin: fixtures for plugin authors (opt-in through the conformance base classes)."""
