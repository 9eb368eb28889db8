"""Structured pruning with physical removal: dependency groups, tensor surgery and model adapters."""
