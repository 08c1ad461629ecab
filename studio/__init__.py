"""Stable Diffusion studio: one engine under a Gradio UI, an A1111-compatible API and a CLI."""

__version__ = "0.1.0"
