"""ControlNet support: preprocessors (annotators) and, elsewhere, units and models."""
