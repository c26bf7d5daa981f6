"""distrag: fine-tune retrieval-augmented generation pipelines and account for what it costs."""

__version__ = "0.1.0"
