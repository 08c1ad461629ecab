"""Model families (SD1, SD2, SDXL, SD3, FLUX.1, ...): what each one is made of and how it samples.

``spec`` declares every family (components, text conditioning, prediction type, latent format,
defaults, size rules); the loaders and the sampling loops read those declarations instead of
testing family names all over the code.
"""
