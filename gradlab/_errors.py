"""Exception types shared by every gradlab module."""

from __future__ import annotations

__all__ = ["GradlabError", "GraphError"]


class GradlabError(RuntimeError):
    """Base class for graph-level problems gradlab detects (not bad arguments).

    Bad arguments raise :class:`ValueError` or :class:`TypeError`; problems with the autograd graph
    (an input that does not reach the output, a function that cannot be differentiated twice, ...)
    raise a subclass of this class. Every message names the function, the argument, what was
    received and the fix.
    """


class GraphError(GradlabError):
    """An input is not connected to the output, or the graph cannot be differentiated as asked."""
