from .perplexity import perplexity  # noqa: F401
