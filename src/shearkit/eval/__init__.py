"""Evaluation: perplexity, speed and memory (zero-shot tasks come through lm-evaluation-harness)."""
from .perplexity import perplexity

__all__ = ["perplexity"]
