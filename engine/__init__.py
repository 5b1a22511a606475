"""Randomized-smoothing certification, certified-robust training and PACD data poisoning.

Public API (a contract; other tools call these names):

- :func:`certify`, :func:`predict`, :class:`CertifyResult` - Cohen et al. (2019) CERTIFY / PREDICT.
- :func:`certify_dataset` - CERTIFY over a data set into a resumable log (several images per forward batch).
- :mod:`engine.metrics` - ACR and certified accuracy.
- :mod:`engine.data` - MNIST (idx) and CIFAR-10 (binary / restricted pickle) loaders.
- :mod:`engine.models` - LeNet for MNIST, CIFAR ResNets, safetensors save / load.
- :func:`train` - standard, Gaussian-augmentation, SmoothAdv and MACER training (checkpoint / resume).
- :mod:`engine.losses` (gaussian_augmentation, macer), :mod:`engine.attacks` (smoothadv).
- :func:`poison`, :class:`PoisonSet`, :func:`evaluate_poison` - PACD (Mehra et al. 2021) with ApproxGrad.
- :func:`hvp`, :func:`mixed_vjp` - Hessian-vector products and the mixed second derivative of the
  training loss (fused R-operator sweep in engine._C; see :mod:`engine.hessian`).
"""

from . import _ext, attacks, data, losses, metrics, models, noise
from ._version import __version__
from .certification import DatasetCertification, certify_dataset
from .evaluate import evaluate_poison
from .hessian import HVPResult, hvp, mixed_vjp
from .pacd import PoisonSet, poison
from .smoothing import CertifyResult, certify, predict
from .train import train

_ext.available()  # load engine._C once (warns once when it is missing)
_ext.kernels_from_the_source_tree()

__all__ = [
    "certify",
    "predict",
    "CertifyResult",
    "certify_dataset",
    "DatasetCertification",
    "train",
    "poison",
    "PoisonSet",
    "evaluate_poison",
    "data",
    "metrics",
    "models",
    "noise",
    "losses",
    "attacks",
    "hvp",
    "mixed_vjp",
    "HVPResult",
    "__version__",
]
