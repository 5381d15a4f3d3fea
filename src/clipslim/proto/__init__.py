"""ProtoCLIP machinery: k-means + PBT (``cluster``), episodes read from the training stream (``episode``), and the
external text teacher's feature cache (``external``). The loss term itself is ``clipslim.objectives.proto``."""

from .cluster import back_translate, key_hash, kmeans, lookup
from .episode import EpisodeBuilder, assemble, cluster_episode, cluster_labels

__all__ = [
    "EpisodeBuilder", "assemble", "back_translate", "cluster_episode", "cluster_labels", "key_hash", "kmeans", "lookup",
]  # fmt: skip
