"""Tiny models for tests and plugin authors: a residual CNN, a transformer encoder and a causal decoder.

Each model lists its blocks (``quant_blocks``) as a chain the engine can reconstruct piece by piece.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantplug.interfaces import UnitSpec


class TinyBasicBlock(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn + (downsampled) shortcut, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyStem(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class TinyHead(nn.Module):
    def __init__(self, cin: int, classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyResNet(nn.Module):
    """3x16x16 input, stem + three basic blocks (one downsampling) + head; about 12 k parameters."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = TinyStem(3, width)
        self.layer1 = nn.Sequential(TinyBasicBlock(width, width), TinyBasicBlock(width, width))
        self.layer2 = nn.Sequential(TinyBasicBlock(width, 2 * width, stride=2))
        self.head = TinyHead(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))

    def quant_blocks(self) -> list[UnitSpec]:
        def layers(prefix: str, module: nn.Module) -> tuple[str, ...]:
            return tuple(
                f"{prefix}.{n}" for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            )

        blocks = [UnitSpec("stem", ("stem",), layers("stem", self.stem), stage="stem")]
        for stage in ("layer1", "layer2"):
            for i, block in enumerate(getattr(self, stage)):
                name = f"{stage}.{i}"
                blocks.append(UnitSpec(name, (name,), layers(name, block), stage=stage))
        blocks.append(UnitSpec("head", ("head",), layers("head", self.head), stage="head"))
        return blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class TinyTransformerLayer(nn.Module):
    """Pre-norm transformer layer (attention + MLP); a tensor in, a tensor out."""

    def __init__(self, dim: int, heads: int, ff: int, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ff)
        self.fc2 = nn.Linear(ff, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.tokens(ids) + self.positions(pos)[None]


class TinyLMHead(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class TinyTransformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab] (decoder, causal) or [B, T, dim] features (encoder)."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, ff: int = 64, layers: int = 2,
                 max_len: int = 32, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.embed = TinyEmbedding(vocab, dim, max_len)
        self.layers = nn.ModuleList(TinyTransformerLayer(dim, heads, ff, causal) for _ in range(layers))
        self.head = TinyLMHead(dim, vocab if causal else dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def quant_blocks(self) -> list[UnitSpec]:
        blocks = [UnitSpec("embed", ("embed",), (), stage="embed")]
        for i, layer in enumerate(self.layers):
            names = tuple(f"layers.{i}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear))
            blocks.append(UnitSpec(f"layers.{i}", (f"layers.{i}",), names, stage="layers"))
        blocks.append(UnitSpec("head", ("head",), ("head.proj",), stage="head"))
        return blocks


def tiny_resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet()


def tiny_decoder(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(causal=True)


def tiny_encoder(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(causal=False)
