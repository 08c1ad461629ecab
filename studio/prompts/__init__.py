"""Prompt text -> conditioning tensors."""
