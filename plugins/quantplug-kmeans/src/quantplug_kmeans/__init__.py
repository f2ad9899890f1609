"""quantplug-kmeans: k-means weight sharing with centroid fine-tuning (Deep Compression, Han et al., ICLR 2016).

* model pass ``kmeans``: per layer, ``2^bits`` centroids by 1-D k-means (linear initialization), centroids
  fine-tuned with the task loss (gradients pooled per centroid), hardened to a lookup table;
* recipe ``kmeans`` (4-bit codebooks in every layer) with preset ``official`` (the paper's 8-bit convolutions and
  5-bit fully connected layer).
"""

from __future__ import annotations

from quantplug import hookimpl
from quantplug.recipes import RecipeSpec
from quantplug_kmeans.clustering import KMeansResult, assign, cluster_means, initial_centroids, kmeans_1d
from quantplug_kmeans.passes import KMeansPass, cluster_layer
from quantplug_kmeans.sharing import LR_UNITS, SharedWeights, centroid_unit

__all__ = [
    "KMEANS",
    "LR_UNITS",
    "KMeansPass",
    "KMeansResult",
    "SharedWeights",
    "assign",
    "cluster_layer",
    "centroid_unit",
    "cluster_means",
    "initial_centroids",
    "kmeans_1d",
]

KMEANS = RecipeSpec(
    name="kmeans",
    description="Deep Compression's trained quantization: per-layer k-means codebooks of 2^bits shared weights "
    "(linear init), centroids fine-tuned with the task loss; every layer, weights only",
    overrides={
        # the affine grid is a placeholder the pass replaces with lookup tables; calibrating it is cheap
        "weight": {"bits": 4, "symmetric": False, "granularity": {"kind": "per_tensor"}},
        "weight_observer.name": "minmax",
        "activation": None,
        "rounding": {"name": "nearest", "options": {}},
        "recon.iters": 0,
        "bits.first_layer_bits": None,  # Deep Compression shares the weights of every layer, first and last too
        "bits.last_layer_bits": None,
        "calib.num_samples": 1024,
        "passes": [{"name": "kmeans", "options": {}}],
    },
    presets={
        # Table 1-4: 8 bits (256 shared weights) per convolution, 5 bits (32) per fully connected layer; the
        # last layer is the only fully connected one of the zoo CNNs
        "official": {"weight.bits": 8, "bits.last_layer_bits": 5},
        "no-finetune": {"passes": [{"name": "kmeans", "options": {"epochs": 0}}]},
    },
    source="Han, Mao, Dally, 'Deep Compression: Compressing Deep Neural Networks with Pruning, Trained "
    "Quantization and Huffman Coding', ICLR 2016",
)


@hookimpl
def register_model_passes(register) -> None:  # type: ignore[no-untyped-def]
    register(KMeansPass)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(KMEANS)
