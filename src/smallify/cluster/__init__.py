"""Weight sharing: k-means codebooks, binary/ternary/power-of-two levels, and the hashing trick (HashedNets).

    small = smallify.cluster(model, smallify.KMeans(bits=4, scope="channel"), data=calib)
    small = smallify.distill(student=small, teacher=model, data=train)    # the centroids learn, indices stay
    smallify.save(small, "model.smallify")                                # codebooks + entropy-coded indices
"""
from smallify.cluster.cluster import ClusterReport, cluster, snap_codebooks
from smallify.cluster.config import Binary, KMeans, PowerOfTwo, Share, Ternary
from smallify.cluster.hashing import HashShare
from smallify.cluster.modules import SharedTwin, expand

__all__ = ["cluster", "snap_codebooks", "expand", "ClusterReport", "KMeans", "Binary", "Ternary", "PowerOfTwo",
           "HashShare", "Share", "SharedTwin"]
