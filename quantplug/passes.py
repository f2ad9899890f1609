"""Runs a recipe's model passes at their stage of a run and keeps their summaries for the manifest."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quantplug.config import Recipe
from quantplug.errors import ConfigError
from quantplug.interfaces import PASS_STAGES, ModelAdapter, PassContext

logger = logging.getLogger(__name__)


class ModelPasses:
    """The ``passes`` slot of a recipe, built once; ``run(stage, model)`` applies those of one stage in order."""

    def __init__(self, session: Any, recipe: Recipe, adapter: ModelAdapter, calib_inputs: list[Any],
                 calib_targets: list[Any], device: torch.device, *, model_id: str | None = None,
                 model_options: Mapping[str, Any] | None = None) -> None:
        self.session, self.recipe, self.adapter = session, recipe, adapter
        self.model_id, self.model_options = model_id, model_options
        self.calib_inputs, self.calib_targets, self.device = calib_inputs, calib_targets, device
        self.passes = [session.make("model_pass", ref) for ref in recipe.passes]
        for p in self.passes:
            if p.stage not in PASS_STAGES:
                raise ConfigError(f"model pass {p.name!r} has stage {p.stage!r}; stages: {', '.join(PASS_STAGES)}")
        self.summaries: dict[str, Any] = {}

    def run(self, stage: str, model: nn.Module, *, fp_model: nn.Module) -> None:
        for p in self.passes:
            if p.stage != stage:
                continue
            ctx = PassContext(self.session, self.recipe, self.adapter, fp_model, self.calib_inputs,
                              self.calib_targets, self.device, self.recipe.calib.seed, stage,
                              model_id=self.model_id, model_options=self.model_options)
            logger.info("model pass %s (stage %s)", p.name, stage)
            self.summaries[p.name] = p.run(model, ctx) or {}
