"""gradlab.per_sample: per-sample gradients and their statistics (norms, second moments, dot
products) from one ordinary forward and backward, and a functional ``vmap(grad)`` helper.

One engine, :class:`PerSampleGradients`; one small closed-form rule per layer family (Linear,
convolutions, Embedding, normalisation layers), registered in :data:`RULES` by :func:`register`
(a :class:`Rule` for your own layer type is one call); and a ``torch.func`` fallback for every
other module with parameters. :func:`per_sample_grads` is ``vmap(grad(f))`` for any loss
function. The user guide is ``docs/guides/per_sample.md`` (the *Per-sample gradients* page of
the documentation).
"""

from gradlab.per_sample import _conv, _embedding, _linear, _normalization  # register the rules
from gradlab.per_sample._engine import STATS, PerSampleGradients
from gradlab.per_sample._functional import per_sample_grads
from gradlab.per_sample._gather import GatheredStats
from gradlab.per_sample._registry import RULES, Rule, register

del _conv, _embedding, _linear, _normalization

__all__ = [
    "RULES",
    "STATS",
    "GatheredStats",
    "PerSampleGradients",
    "Rule",
    "per_sample_grads",
    "register",
]
