"""Hessian analysis of a loss: trace, diagonal, top eigenvalues and spectral density.

Every function takes ``loss_fn``, a zero-argument callable returning a scalar loss, and
``params``, the tensors to take the Hessian with respect to: a tensor, a sequence of tensors, or a
module (its parameters with ``requires_grad``; pass a submodule for one layer or block). They
are estimators written against one linear operator, :func:`hessian_operator`: ``loss_fn`` is
called once, the gradient is built with ``create_graph=True``, and each Hessian-vector product is
one double backward through that graph (the engine shared with :func:`gradlab.hvp`; batched with
``is_grads_batched`` only for small models, where it measurably wins), so the cost is one
forward/backward plus one double backward per product: the cost of a hand-written
PyHessian-style loop.

Whole datasets and several processes: every function takes ``data=`` (an iterable of batches,
e.g. a ``DataLoader``; ``loss_fn(batch)`` is called per batch and the curvature is that of the
dataset-mean loss, batches weighted by their size, taken from the batch's first tensor, or by
``batch_weight(batch)``; one batch graph in memory at a time) and ``distributed=True`` (under an
initialised ``torch.distributed`` group, each rank passes its own shard as ``data=``; products
are summed over the ranks, weighted by their sample counts, and probes are drawn identically on
all ranks, so every rank returns the result of one process on the union of the data).

Parameters the loss does not use raise :class:`gradlab.GraphError` naming them.

Nothing is left behind: ``.grad`` is never written (only ``torch.autograd.grad`` is used), and
when ``params`` is a module its train/eval flags are restored and its buffers (BatchNorm running
statistics) are never touched: while ``loss_fn`` runs each buffer is replaced by a clone, and the
original tensors are put back, so their values and version counters are unchanged and a graph the
caller built before (a pending ``loss.backward()``) stays usable.

BatchNorm: with a module, ``mode="eval"`` (the default) puts the whole module in eval mode for the
computation, so the Hessian is that of the deterministic eval-mode loss (what PyHessian asks for);
``mode="train"`` uses batch statistics (the Hessian then includes the coupling through the batch
statistics; the running statistics the forward passes update are clones, dropped afterwards);
``mode=None`` leaves the module as it is. With tensors or a sequence, ``loss_fn`` runs as is and is
called exactly once.

Randomness: probes come from a seed drawn from ``generator`` (a ``torch.Generator`` or an int
seed); without it, from the global RNG (one draw). With ``distributed=True`` rank 0's seed is used
on every rank.

Progress: ``progress=True`` prints one status line to stderr, rewritten in place (``\\r``) at most
ten times a second and ended by a newline, e.g. ``hessian_trace: 120/200 Hessian-vector products,
3.1 s, ETA 2.0 s``; a callable is called as ``progress(done, total)`` instead (for tqdm, wandb, a
logger). Every function counts Hessian-vector products, the unit that dominates the cost (one
Lanczos step is one product; the single forward/backward that builds the gradient comes before the
count starts); with ``data=`` of B batches, a product of the dataset Hessian counts B. Where a
method stops early (Lanczos or power iteration converged), the last update is ``(done, done)``, so
a bar ends full. Default ``False``: silent.

Beyond the Hessian: :func:`ggn_operator` (the generalized Gauss-Newton, by jvp, loss Hessian and
vjp), :func:`fisher_operator` (empirical or Monte-Carlo Fisher), :func:`kfac_operator` (KFAC and
its inverse) and :func:`ggn_diagonal` (exact or Monte-Carlo), for a model and a loss module
(``loss_fn(output, y)``) on a batch ``(X, y)`` or ``data=``; the user guide
``docs/guides/curvature_operators.md`` walks through them.

Any operator: :func:`trace`, :func:`diagonal`, :func:`eigenvalues` and :func:`spectrum` take a
gradlab operator (:class:`CurvatureOperator`: Hessian, GGN, Fisher, KFAC), a
``scipy.sparse.linalg.LinearOperator``, a curvlinops operator, or anything with ``@`` and
``shape``; ``method=`` is a key of :data:`TRACE_METHODS`, :data:`DIAGONAL_METHODS` or
:data:`EIGENVALUE_METHODS`. The ``hessian_*`` functions build the Hessian operator and call them.

Per layer or block: :func:`hessian_trace_by_block` gives :math:`\\operatorname{tr} H_{bb}` for
each block of a dict (e.g. ``dict(model.named_children())``) from one graph.

References:
    Hutchinson, *A stochastic estimator of the trace of the influence matrix* (1989);
    Meyer, Musco, Musco, Woodruff, *Hutch++: Optimal Stochastic Trace Estimation* (SOSA 2021);
    Bekas, Kokiopoulou, Saad, *An estimator for the diagonal of a matrix* (2007);
    Ubaru, Chen, Saad, *Fast estimation of tr(f(A)) via stochastic Lanczos quadrature* (2017);
    Yao, Gholami, Keutzer, Mahoney, *PyHessian* (2020); curvlinops (Dangel et al.).
"""

from gradlab.curvature._base import CurvatureOperator as CurvatureOperator
from gradlab.curvature._diagonal import hessian_diagonal as hessian_diagonal
from gradlab.curvature._eigenvalues import hessian_eigenvalues as hessian_eigenvalues
from gradlab.curvature._estimators import DIAGONAL_METHODS as DIAGONAL_METHODS
from gradlab.curvature._estimators import EIGENVALUE_METHODS as EIGENVALUE_METHODS
from gradlab.curvature._estimators import TRACE_METHODS as TRACE_METHODS
from gradlab.curvature._estimators import diagonal as diagonal
from gradlab.curvature._estimators import eigenvalues as eigenvalues
from gradlab.curvature._estimators import spectrum as spectrum
from gradlab.curvature._estimators import trace as trace
from gradlab.curvature._ggn import GGNOperator as GGNOperator
from gradlab.curvature._ggn import fisher_operator as fisher_operator
from gradlab.curvature._ggn import ggn_diagonal as ggn_diagonal
from gradlab.curvature._ggn import ggn_operator as ggn_operator
from gradlab.curvature._kfac import KFACOperator as KFACOperator
from gradlab.curvature._kfac import kfac_operator as kfac_operator
from gradlab.curvature._operator import HessianOperator as HessianOperator
from gradlab.curvature._operator import hessian_operator as hessian_operator
from gradlab.curvature._results import Eigenpairs as Eigenpairs
from gradlab.curvature._results import Spectrum as Spectrum
from gradlab.curvature._spectrum import hessian_spectrum as hessian_spectrum
from gradlab.curvature._trace import hessian_trace as hessian_trace
from gradlab.curvature._trace import hessian_trace_by_block as hessian_trace_by_block

__all__ = [
    "DIAGONAL_METHODS",
    "EIGENVALUE_METHODS",
    "TRACE_METHODS",
    "CurvatureOperator",
    "Eigenpairs",
    "GGNOperator",
    "HessianOperator",
    "KFACOperator",
    "Spectrum",
    "diagonal",
    "eigenvalues",
    "fisher_operator",
    "ggn_diagonal",
    "ggn_operator",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_spectrum",
    "hessian_trace",
    "hessian_trace_by_block",
    "kfac_operator",
    "spectrum",
    "trace",
]
