"""Plugin-author kit: tiny models, synthetic data, conformance base classes, an opt-in pytest plugin."""

from quantplug.testing.models import TinyResNet, TinyTransformer, tiny_decoder, tiny_encoder, tiny_resnet

__all__ = ["TinyResNet", "TinyTransformer", "tiny_decoder", "tiny_encoder", "tiny_resnet"]
