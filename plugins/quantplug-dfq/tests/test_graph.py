"""Which layer pairs DFQ finds: fx and the nn.Sequential fallback, exclusivity, activations, grouped convs."""

from __future__ import annotations

import torch
from quantplug_dfq.activations import ChannelClip
from quantplug_dfq.graph import find_links, input_index, replace_with_channel_clip
from torch import nn

EXPECTED = {
    ("stem.0", "block1.conv.0.0"): ("relu6", True, False),
    ("block1.conv.0.0", "block1.conv.1.0"): ("relu6", True, True),
    ("block1.conv.1.0", "block1.conv.2.0"): ("relu6", True, False),
    ("block1.conv.2.0", "block2.conv.0.0"): ("identity", False, False),  # block2's input also feeds the residual
    ("block2.conv.0.0", "block2.conv.1.0"): ("relu6", True, True),
    ("block2.conv.1.0", "block2.conv.2.0"): ("relu6", True, False),
    ("last.0", "classifier.1"): ("relu6", True, False),  # through pool, flatten and dropout
}


def test_fx_finds_every_pair_with_activation_and_exclusivity(tiny_mobilenet) -> None:  # type: ignore[no-untyped-def]
    links = find_links(tiny_mobilenet())
    found = {(lk.producer, lk.consumer): (lk.activation, lk.exclusive, lk.consumer_padded) for lk in links}
    assert found == EXPECTED
    assert all(lk.source == "fx" for lk in links)
    assert {lk.activation_module for lk in links if lk.activation == "relu6"} >= {"stem.2", "last.2"}


def test_sequential_fallback_when_fx_cannot_trace(tiny_mobilenet, images) -> None:  # type: ignore[no-untyped-def]
    model = tiny_mobilenet(untraceable=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    links = find_links(model, lambda m: m(images))
    assert links and all(lk.source == "sequential" for lk in links)
    found = {(lk.producer, lk.consumer) for lk in links}
    # only pairs inside one nn.Sequential: the blocks' own chains (stem -> block1, residual paths and the
    # functional head are invisible without the graph)
    assert found == {("block1.conv.0.0", "block1.conv.1.0"), ("block1.conv.1.0", "block1.conv.2.0"),
                     ("block2.conv.0.0", "block2.conv.1.0"), ("block2.conv.1.0", "block2.conv.2.0")}
    assert all(lk.exclusive for lk in links)  # verified on the batch: the chains really are chains
    # the probes left the model as it was: same values, ReLU6 modules still in place
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()
    assert isinstance(model.block1.conv[0][2], nn.ReLU6)
    # without data the module order proves nothing: no fallback pair may be scaled
    unverified = find_links(model)
    assert {(lk.producer, lk.consumer) for lk in unverified} == found
    assert not any(lk.exclusive for lk in unverified) and all("no calibration batch" in lk.reason for lk in unverified)


def test_residual_sum_and_shared_relu_are_handled() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.relu = nn.ReLU6()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.a(x))
            z = self.b(y) + y  # y has two users
            return self.c(self.relu(z))  # an addition is not a link

    links = find_links(Shared())
    assert [(lk.producer, lk.consumer) for lk in links] == [("a", "b")]
    link = links[0]
    assert not link.exclusive
    assert link.activation_module is None  # the ReLU6 module is called twice: it must not be replaced
    assert replace_with_channel_clip(Shared(), link) is None


def test_input_index_of_grouped_and_depthwise_convs() -> None:
    grouped = nn.Conv2d(6, 4, 3, groups=2)  # weight [4, 3, 3, 3]: outputs 0-1 read inputs 0-2, 2-3 read 3-5
    assert input_index(grouped).tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    depthwise = nn.Conv2d(5, 5, 3, groups=5)
    assert input_index(depthwise).flatten().tolist() == [0, 1, 2, 3, 4]
    assert input_index(nn.Linear(3, 2)).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_channel_clip_replaces_relu6_exactly(tiny_mobilenet, images) -> None:  # type: ignore[no-untyped-def]
    model = tiny_mobilenet()
    before = model(images)
    link = next(lk for lk in find_links(model) if lk.producer == "stem.0")
    clip = replace_with_channel_clip(model, link)
    assert isinstance(clip, ChannelClip) and isinstance(model.stem[2], ChannelClip)
    assert torch.equal(clip.upper, torch.full((8,), 6.0))
    assert torch.equal(model(images), before)
    x = torch.tensor([[-1.0, 3.0], [7.0, 0.5]]).reshape(1, 2, 2, 1)
    clip2 = ChannelClip(torch.tensor([2.0, 6.0]))
    assert clip2(x).flatten().tolist() == [0.0, 2.0, 6.0, 0.5]
    tokens = torch.tensor([[[-1.0, 3.0], [7.0, 0.5], [4.0, 9.0]]])  # [batch, tokens, features]
    assert ChannelClip(torch.tensor([2.0, 6.0]), channel_dim=-1)(tokens).flatten().tolist() == [
        0.0, 3.0, 2.0, 0.5, 2.0, 6.0]


def test_relu6_after_a_linear_layer_clips_the_feature_dimension() -> None:
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU6(), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(2, 5, 4) * 10  # token sequences: features are the last dimension
    before = model(x)
    (link,) = find_links(model)
    clip = replace_with_channel_clip(model, link)
    assert clip is not None and clip.channel_dim == -1
    assert torch.equal(model(x), before)
