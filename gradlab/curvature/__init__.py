"""Hessian analysis of a loss: trace, diagonal, top eigenvalues and spectral density.

Every function takes ``loss_fn``, a zero-argument callable returning a scalar loss, and
``params``, the tensors to take the Hessian with respect to: a tensor, a sequence of tensors, or a
module (its parameters with ``requires_grad``; pass a submodule for one layer or block). They
call ``loss_fn`` once, build the gradient with ``create_graph=True`` and then use Hessian-vector
products of that one graph (double backward, batched with ``is_grads_batched`` where the ops
allow), so the cost is one forward/backward plus one double-backward per probe.

Nothing is left behind: ``.grad`` is never written (only ``torch.autograd.grad`` is used), and
when ``params`` is a module its train/eval flags and buffers (BatchNorm running statistics) are
restored afterwards. BatchNorm: with a module, ``mode="eval"`` (the default) puts the whole module
in eval mode for the computation, so the Hessian is that of the deterministic eval-mode loss (what
PyHessian asks for); ``mode="train"`` uses batch statistics (the Hessian then includes the
coupling through the batch statistics, and the running statistics updated by the single forward
pass are restored afterwards); ``mode=None`` leaves the module as it is. With tensors or a
sequence, ``loss_fn`` runs as is and is called exactly once.

Randomness: probes come from ``generator`` (a ``torch.Generator`` or an int seed); without it,
from the global RNG.

Progress: ``progress=True`` prints one status line to stderr, rewritten in place (``\\r``) at
most ten times a second and ended by a newline, e.g. ``hessian_trace: 120/200 Hessian-vector
products, 3.1 s, ETA 2.0 s``; a callable is called as ``progress(done, total)`` instead (for tqdm,
wandb, a logger). Every function counts Hessian-vector products, the unit that dominates the cost
(one Lanczos step is one product; the single forward/backward that builds the gradient comes
before the count starts). Where a method stops early (Lanczos or power iteration converged), the
last update is ``(done, done)``, so a bar ends full. Default ``False``: silent.

Per layer or block: :func:`hessian_trace_by_block` gives :math:`\\operatorname{tr} H_{bb}` for
each block of a dict (e.g. ``dict(model.named_children())``) from one graph.

References:
    Hutchinson, *A stochastic estimator of the trace of the influence matrix* (1989);
    Meyer, Musco, Musco, Woodruff, *Hutch++: Optimal Stochastic Trace Estimation* (SOSA 2021);
    Bekas, Kokiopoulou, Saad, *An estimator for the diagonal of a matrix* (2007);
    Ubaru, Chen, Saad, *Fast estimation of tr(f(A)) via stochastic Lanczos quadrature* (2017);
    Yao, Gholami, Keutzer, Mahoney, *PyHessian* (2020); curvlinops (Dangel et al.).
"""

from gradlab.curvature._core import Eigenpairs as Eigenpairs
from gradlab.curvature._core import Spectrum as Spectrum
from gradlab.curvature._core import hessian_diagonal as hessian_diagonal
from gradlab.curvature._core import hessian_eigenvalues as hessian_eigenvalues
from gradlab.curvature._core import hessian_spectrum as hessian_spectrum
from gradlab.curvature._core import hessian_trace as hessian_trace
from gradlab.curvature._core import hessian_trace_by_block as hessian_trace_by_block

__all__ = [
    "Eigenpairs",
    "Spectrum",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "hessian_trace_by_block",
]
