"""musiclib: tag a music catalog with few labels (SemiSupCon pretraining, embeddings, few-shot probes)."""

__version__ = "0.1.0"
