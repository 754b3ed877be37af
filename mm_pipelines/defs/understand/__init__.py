"""The understand group."""
