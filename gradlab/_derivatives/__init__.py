"""Derivatives: ``grad``/``backward``, ``jacobian``/``hessian``/``hvp``/``vjp``/``jvp``,
``derivative`` and the ``strategy="auto"`` measurement. Private: the public names are re-exported
by :mod:`gradlab`."""
