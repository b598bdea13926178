"""triton-adadelta: a fused AdaDelta optimizer for PyTorch, one Triton kernel per step.

``triton_adadelta.Adadelta`` is a drop-in ``torch.optim.Adadelta``.
"""

from .optimizer import Adadelta
from .update import backend_for

__all__ = ["Adadelta", "backend_for"]
__version__ = "0.1.0"
