"""ViLex: images as visual words in a frozen text-to-image model's text-embedding space."""

from .model import ViLexModel, ViLexOutput
from .pipeline import ViLexPipeline, ViLexPipelineOutput

__all__ = ["ViLexModel", "ViLexOutput", "ViLexPipeline", "ViLexPipelineOutput"]
__version__ = "0.1.0"
