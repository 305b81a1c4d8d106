"""ViLex: images as visual words in a frozen text-to-image model's text-embedding space."""

__all__ = ["ViLexModel", "ViLexOutput", "ViLexPipeline", "ViLexPipelineOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import vilex.<anything>` (the CLI, Triton's model.py files) should not pay for importing
    # torch and diffusers until the model classes are actually used.
    if name in ("ViLexModel", "ViLexOutput"):
        from . import model

        return getattr(model, name)
    if name in ("ViLexPipeline", "ViLexPipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'vilex' has no attribute {name!r}")
