"""Exception types shared by every gradlab module."""

from __future__ import annotations

__all__ = ["GradlabError", "GraphError"]


class GradlabError(RuntimeError):
    """Base class for graph-level problems gradlab detects (not bad arguments).

    Bad arguments raise :class:`ValueError` or :class:`TypeError`; problems with the autograd graph
    (an input that does not reach the output, a function that cannot be differentiated twice, ...)
    raise a subclass of this class. Every message names the function, the argument, what was
    received and the fix.

    Example:
        >>> issubclass(gl.GraphError, gl.GradlabError), issubclass(gl.GradlabError, RuntimeError)
        (True, True)
    """


class GraphError(GradlabError):
    """An input is not connected to the output, or the graph cannot be differentiated as asked.

    Example:
        >>> a = torch.ones(2, requires_grad=True)
        >>> b = torch.ones(2, requires_grad=True)  # not used by the loss
        >>> try:
        ...     gl.grad((2 * a).sum(), [a, b], unused="error")
        ... except gl.GraphError as e:
        ...     print("inputs[1]" in str(e), "unused=" in str(e))  # names the input and the fix
        True True
    """
