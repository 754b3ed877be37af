"""The ingest group."""
