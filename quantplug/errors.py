"""Error types. Every error quantplug raises for bad input says what to do next."""

from __future__ import annotations


class QuantplugError(Exception):
    """Base class of the errors the CLI prints as one line (no traceback unless --debug)."""


class ConfigError(QuantplugError, ValueError):
    """A configuration value is invalid (bit width, option name, override path...)."""


class UnknownComponentError(QuantplugError, KeyError):
    """A component name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(QuantplugError):
    """Two different plugins registered the same component name."""


class IncompatibleComponentsError(QuantplugError):
    """The components named by a recipe cannot work together."""


class ModelLoadError(QuantplugError):
    """A model id could not be resolved or loaded."""


class DataError(QuantplugError):
    """Data could not be found, read, or contains invalid values (NaN / inf)."""


class ArtifactError(QuantplugError):
    """A saved run directory is missing, partial or corrupt."""
