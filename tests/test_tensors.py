"""quantplug.tensors.to_device: model inputs of every shape adapters produce."""

from __future__ import annotations

from collections import UserDict

import torch

from quantplug.tensors import to_device


def test_tensors_mappings_and_other_values() -> None:
    meta = torch.device("meta")
    batch = UserDict({"input_ids": torch.ones(2, 3), "nested": {"mask": torch.zeros(2)}, "name": "x"})
    out = to_device(batch, meta)  # a Mapping that is not a dict, like transformers' BatchEncoding
    assert isinstance(out, dict) and out["input_ids"].device == meta and out["nested"]["mask"].device == meta
    assert out["name"] == "x" and to_device(3, meta) == 3 and to_device(torch.ones(1), meta).device == meta
