"""Evaluate: splice SAE reconstructions into the language model and measure what they cost."""
