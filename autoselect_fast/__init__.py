"""autoselect_fast: learned visual-token pruning (AutoSelect) for vision-language models."""
__version__ = "0.1.0"
