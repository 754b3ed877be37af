"""The serve group."""
