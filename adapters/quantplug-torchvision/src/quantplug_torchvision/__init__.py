"""quantplug adapter for torchvision models (Fashion-MNIST model zoo, data helpers)."""
