"""Example extension: a "posterize" ControlNet preprocessor with a slider.

Shows the whole extension API: a folder in extensions/ with an extension.py that defines
register(api). See studio/extensions.py for what api offers.
"""

from PIL import ImageOps


def posterize(image, resolution, bits, _unused=None, **ctx):
    # fewer colour levels give flat regions a ControlNet "tile"/"color" model can follow
    return ImageOps.posterize(image.convert("RGB"), int(bits))


def register(api):
    api.add_preprocessor("posterize", posterize, label="Posterize (example extension)",
                         slider_1=api.slider("Bits per channel", 1, 8, 3))
