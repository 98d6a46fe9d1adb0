"""Domain discovery: tf-idf features, balanced k-means, save/load without pickle."""

from moe_lab.ensembles.clustering.clusterer import Clusterer
from moe_lab.ensembles.clustering.kmeans import BalancedKMeans, balanced_assign, nearest_centroid

__all__ = ["BalancedKMeans", "Clusterer", "balanced_assign", "nearest_centroid"]
