"""The Graft trainer: fine-tunes causal language models from a FineTuneJob spec.

Never imports kopf; torch and friends are imported by the modules that need them.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
