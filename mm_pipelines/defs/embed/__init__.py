"""The embed group."""
