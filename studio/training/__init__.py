"""Training: LoRA, textual-inversion embeddings and hypernetworks, with one shared loop."""
