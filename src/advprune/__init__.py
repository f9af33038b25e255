"""advprune: adversarial pruning toolkit and benchmark.

Prune a model with a chosen method, train it with a chosen (adversarial) objective, evaluate it
with one exact protocol, and record the result. Subpackages: ``models``, ``data``,
``sparsity``, ``attacks``, ``training``, ``methods``, ``evaluation``; checkpoints in
``advprune.checkpoint``; the command line in ``advprune.cli``.
"""

from advprune._version import __version__

__all__ = ["__version__", "finetune", "prune"]


def __getattr__(name: str):  # lazy: `import advprune` stays light
    if name in ("prune", "finetune"):
        from advprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'advprune' has no attribute {name!r}")
