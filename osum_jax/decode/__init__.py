"""``osum-decode``: decode a test set with a JAX checkpoint on the training mesh (batched greedy or beam search
with a KV cache, bucketed static shapes), writing ``osum-infer``'s result lines.

:mod:`.program` builds the sharded decode program; :mod:`.cli` is the command (and its ``--plan --target``
compile for pod targets). Nothing else in ``osum_jax`` imports this package.
"""
