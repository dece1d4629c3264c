"""Training: mesh and logical-axis sharding, trainable sets, optax, orbax checkpoints, the loop (``osum-train``)."""
