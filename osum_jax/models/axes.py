"""Logical axis names carried by every parameter (``out_sharding`` metadata).

The trainer maps these names to mesh axes with one rules table in the YAML (MaxText-style); the model never
names a mesh axis. Two dimensions of one tensor never share a name, so any rule table yields a valid
``PartitionSpec``.

=============  ===============================================================================
name           dimension
=============  ===============================================================================
layers         leading axis of scanned (stacked) layers
embed          a module's model width (Whisper/adapter d_model, LLM hidden size) on the output side
embed_in       model width on the input side of a square projection/conv (Whisper conv2, adapter)
mel            log-mel bins (Whisper conv1 input)
conv_width     convolution kernel taps
heads          query heads x head_dim (attention projections)
kv_heads       key/value heads x head_dim (grouped-query attention)
mlp            feed-forward hidden width
vocab          LLM vocabulary
speech_vocab   rows of OSUM's speech token embedding (bos/eos live there)
lora_rank      LoRA rank
norm           normalisation scales/biases
positions      rows of fixed sinusoid tables
=============  ===============================================================================
"""

LOGICAL_AXES = (
    "layers", "embed", "embed_in", "mel", "conv_width", "heads", "kv_heads", "mlp", "vocab", "speech_vocab",
    "lora_rank", "norm", "positions",
)
