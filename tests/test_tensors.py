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


def test_fingerprint_tells_data_apart_by_bytes_dtype_shape_and_order() -> None:
    from quantplug.tensors import fingerprint

    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tokens = {"input_ids": torch.arange(4), "attention_mask": torch.ones(4, dtype=torch.long)}
    base = fingerprint([x, tokens, None])
    assert base == fingerprint([x.clone(), dict(reversed(list(tokens.items()))), None])  # key order is irrelevant
    assert len({base,
                fingerprint([x.reshape(3, 2), tokens, None]),  # same bytes, other shape
                fingerprint([x.double(), tokens, None]),  # same values, other dtype
                fingerprint([tokens, x, None]),  # other order
                fingerprint([x + 1e-6 * (x == 5), tokens, None]),  # one element nudged
                fingerprint([x, tokens, torch.tensor(0)])}) == 6
