"""Curation drivers (the `curate` group): near-duplicates, content scores and flags,
captions, and how they shape search results and LoRA training sets."""
