"""workbench: a research workbench for CLIP-ReID style re-identification."""

__version__ = "0.1.0"
