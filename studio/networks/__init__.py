"""Extra networks: textual-inversion embeddings and friends (files, not model integration)."""
