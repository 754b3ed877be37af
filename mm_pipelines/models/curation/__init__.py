"""Curation models on vectors the pipeline already has: scoring heads (aesthetic, safety),
perceptual hashes and the keep-one choice for near-duplicates, a CLIP zero-shot tagger and a
transformers image-to-text captioner."""
