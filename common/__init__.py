"""rlsolo's shared machinery: namedarraytuple, environments, samplers, replay, kernels, logging."""
