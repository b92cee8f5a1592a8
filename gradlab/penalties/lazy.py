"""Lazy regularization (StyleGAN2): apply a penalty every k steps with gain k."""

from __future__ import annotations

from typing import NamedTuple

from gradlab._validate import check_int, check_nonnegative, check_probability, check_type, message

__all__ = ["AdamHyperparameters", "LazyRegularizer"]


class AdamHyperparameters(NamedTuple):
    """Adjusted Adam hyperparameters: ``torch.optim.Adam(params, lr=h.lr, betas=h.betas)``.

    Example:
        >>> from gradlab.penalties import LazyRegularizer
        >>> h = LazyRegularizer(every=16).adam_hyperparameters(lr=0.002, betas=(0.0, 0.99))
        >>> round(h.lr, 6), tuple(round(b, 6) for b in h.betas)
        (0.001882, (0.0, 0.990585))
    """

    lr: float
    betas: tuple[float, float]


class LazyRegularizer:
    r"""Schedule for a penalty computed only every ``every`` steps, with gain ``every``.

    StyleGAN2's lazy regularization: the penalty (R1 for the critic, path length for the
    generator) is evaluated on steps ``0, k, 2k, ...`` and multiplied by :math:`k`, so that its
    average contribution over :math:`k` steps equals applying it every step, at about
    :math:`1/k` of the cost.

    When the penalty is optimised in a separate optimizer step of its own (StyleGAN2's
    ``Dreg``/``Greg`` phases: :math:`k + 1` optimizer steps per :math:`k` minibatches), the Adam
    hyperparameters are adjusted by :math:`c = k/(k+1)`: ``lr * c`` and ``beta ** c``
    (:meth:`adam_hyperparameters`). If you add the lazy penalty to the step's main loss instead,
    no adjustment is needed.

    Under DistributedDataParallel the penalty-only backward of a separate regularization step is
    safe with gradlab's penalties (they send a zero gradient into the critic's outputs).

    Args:
        every: :math:`k \ge 1`, the interval in steps (16 for R1 and 4 for path length in
            StyleGAN2).

    Example:
        >>> from gradlab.penalties import LazyRegularizer
        >>> lazy = LazyRegularizer(every=4)
        >>> [step for step in range(10) if lazy.is_due(step)], lazy.gain
        ([0, 4, 8], 4.0)
        >>> h = lazy.adam_hyperparameters(lr=0.0025, betas=(0.0, 0.99))
        >>> round(h.lr, 6), round(h.betas[1], 6)
        (0.002, 0.991992)

    References:
        Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020,
        section 3.1 and appendix B.
    """

    def __init__(self, every: int) -> None:
        self.every = check_int(
            "LazyRegularizer",
            "every",
            every,
            minimum=1,
            fix="Pass the number of steps between applications, e.g. every=16",
        )

    @property
    def gain(self) -> float:
        """The factor (``every``) to multiply the penalty by on the steps where it is due."""
        return float(self.every)

    @property
    def ratio(self) -> float:
        """:math:`c = k/(k+1)`, the minibatch ratio of StyleGAN2's Adam adjustment."""
        return self.every / (self.every + 1)

    def is_due(self, step: int) -> bool:
        """Whether the penalty is applied at ``step`` (counted from 0): ``step % every == 0``."""
        step = check_int("LazyRegularizer.is_due", "step", step, minimum=0)
        return step % self.every == 0

    def adam_hyperparameters(
        self, lr: float, betas: tuple[float, float] = (0.9, 0.999)
    ) -> AdamHyperparameters:
        """Adam's ``lr`` and ``betas`` adjusted for the extra regularization steps.

        ``lr * c`` and ``(beta1 ** c, beta2 ** c)`` with ``c = every / (every + 1)``, as
        StyleGAN2 does for an optimizer that also takes a step every ``every`` minibatches for the
        penalty alone.

        Args:
            lr: Adam's learning rate, a finite number >= 0.
            betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)`` (what
                :class:`torch.optim.Adam` accepts).

        Raises:
            TypeError: ``lr`` not a number, ``betas`` not a tuple (or list) of numbers.
            ValueError: a negative or non-finite ``lr``, ``betas`` not a pair, a beta outside
                ``[0, 1)``.
        """
        fn = "LazyRegularizer.adam_hyperparameters"
        lr = check_nonnegative(fn, "lr", lr, fix="Pass Adam's learning rate, e.g. lr=0.002")
        fix = "Pass e.g. betas=(0.9, 0.999), as for torch.optim.Adam (StyleGAN2: (0.0, 0.99))"
        fix_beta = "Adam's betas are decay rates: pass e.g. betas=(0.9, 0.999)"
        check_type(fn, "betas", betas, (tuple, list), what="a pair (beta1, beta2)", fix=fix)
        if len(betas) != 2:
            raise ValueError(message(fn, "betas", "a pair (beta1, beta2)", betas, fix))
        b1, b2 = (
            check_probability(fn, f"betas[{i}]", b, high_open=True, fix=fix_beta)
            for i, b in enumerate(betas)
        )
        c = self.ratio
        return AdamHyperparameters(lr * c, (b1**c, b2**c))

    def __repr__(self) -> str:
        return f"LazyRegularizer(every={self.every})"
