"""ctxjax: on-policy context distillation with No-Context Anchoring (NCA) in JAX/Flax NNX."""
