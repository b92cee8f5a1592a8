"""gradlab.per_sample: per-sample gradients and their statistics (norms, second moments, dot
products) from one ordinary forward and backward, and a functional ``vmap(grad)`` helper.

One engine (:mod:`gradlab.per_sample._engine`), one small rule per layer family registered in
:data:`gradlab.per_sample._registry.RULES`, and a ``torch.func`` fallback for every other module
with parameters. See ../shared/API.md (gradlab.per_sample) and docs/guides/per_sample.md.
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
