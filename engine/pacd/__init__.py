"""PACD: poisoning against certified defenses (Mehra, Kailkhura, Chen and Hamm, CVPR 2021).

Clean-label, L_inf-bounded poison on every training image of a target class, crafted by bilevel
optimisation (ApproxGrad) so that models trained on it with a certified-robust procedure
(Gaussian augmentation, MACER or SmoothAdv) have a smaller certified radius on the target class.

Upper level (minimised over the poison u): the soft certified-radius surrogate on validation
images of the target class (:func:`soft_radius_objective`). Lower level (minimised over the
weights w): the training loss of the chosen procedure on clean non-target data plus the poison.
Per outer step, on a minibatch: ``niter1`` Adam steps on w; approximately solve
(H + s I) p = dF/dw by ``niter2`` solver steps (p warm-started); step u along
-(d^2 G / du dw) p, then project onto the eps box around the originals and onto [0, 1].

The package:

- :mod:`engine.pacd.crafter`: :func:`poison` (the whole attack) and :class:`Crafter` (the attack one outer step at
  a time, with ``state_dict`` / ``load_state_dict``), driven by a :class:`PoisonConfig` (:mod:`engine.pacd.config`).
- :mod:`engine.pacd.lower`: the lower level (:class:`LowerLevel` on an :class:`OuterBatch`; its second-order
  products). :mod:`engine.pacd.objective`: the upper objective and the keyed random streams.
- :mod:`engine.pacd.poisonset`: :class:`PoisonSet`, its files and encodings, and poisoning checkpoints
  (:func:`read_checkpoint`; written with :mod:`engine.checkpoint`, as engine.train's are). :mod:`engine.pacd.compact`:
  the same checkpoints in about a third of the size, lossy (:func:`compact_checkpoint`, :func:`expand_checkpoint`).
- :mod:`engine.pacd.combine` (:func:`combine_poisons`), :mod:`engine.pacd.controls` (:func:`random_poison`) and
  :mod:`engine.pacd.presets` (:func:`preset`: settings of published runs).
"""

# (the private names: those that engine's modules, the tests and earlier scripts import from engine.pacd)
from .combine import _RUN_KEYS, COMBINE, combine_poisons  # noqa: F401
from .compact import COMPACT_KEY, compact_checkpoint, expand_checkpoint, read_compact_checkpoint
from .config import PoisonConfig, _count, _positive  # noqa: F401
from .controls import CONTROLS, random_poison
from .crafter import Crafter, _float_images, _PhaseClock, _RowAdam, _solve_advice, poison  # noqa: F401
from .lower import (  # noqa: F401
    METHODS,
    LowerLevel,
    OuterBatch,
    _Functional,
    _Lower,
    _method_args,
    _Step,
    resolve_method_args,
)
from .objective import _generator, derive_seed, keyed_generator, soft_radius_objective  # noqa: F401
from .poisonset import (  # noqa: F401
    ENCODINGS,
    FORMAT,
    PoisonError,
    PoisonSet,
    _brief,
    _check_poison_meta,
    _check_poison_tensors,
    _content_hash,
    _described,
    _hash_clean,
    _history_summary,
    _int8_decode,
    _int8_encode,
    _int8_scale,
    _load_checkpoint,
    _poison_sha256,
    _project,
    _same_bits,
    _same_shape,
    _save_checkpoint,
    _sign_pack,
    _sign_unpack,
    _vertex,
    init_record,
    read_checkpoint,
    read_poison_header,
)
from .presets import DEVIATIONS, PRESETS, preset

__all__ = [
    "PoisonSet",
    "PoisonError",
    "poison",
    "combine_poisons",
    "soft_radius_objective",
    "derive_seed",
    "METHODS",
    "ENCODINGS",
    "CONTROLS",
    "random_poison",
    "PRESETS",
    "preset",
    # the attack in parts (engine.pacd.crafter, .config, .lower, .objective, .poisonset)
    "PoisonConfig",
    "Crafter",
    "LowerLevel",
    "OuterBatch",
    "resolve_method_args",
    "keyed_generator",
    "read_checkpoint",
    "compact_checkpoint",
    "expand_checkpoint",
    "read_compact_checkpoint",
    "COMPACT_KEY",
    "read_poison_header",
    "init_record",
    "COMBINE",
    "DEVIATIONS",
]
