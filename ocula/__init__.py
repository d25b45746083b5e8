"""ocula: open vision-language models with the transformers API, a fast engine and a server."""

__version__ = "0.1.0"
