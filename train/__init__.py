"""Train: BatchTopK and baseline sparse autoencoders on cached activations."""
