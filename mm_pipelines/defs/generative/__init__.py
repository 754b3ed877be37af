"""The generative group."""
