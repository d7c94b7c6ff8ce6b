"""sam_optax: sharpness-aware minimization as Optax gradient transformations.

Put a perturbation transformation first in any ``optax.chain``::

    tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=0.05), optax.sgd(0.1, momentum=0.9))
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)

The core imports nothing but jax, optax and chex. Flax helpers live in
``sam_optax.flax_utils``, sharpness analysis in ``sam_optax.analysis``, and the
experiment code (models, datasets, the ``sam-optax`` command) in
``sam_optax.experiments``.
"""

from sam_optax.fsam import FSAMState, fsam_perturb
from sam_optax.gsam import gsam_perturb, rho_schedule_from_learning_rate
from sam_optax.looksam import LookSAMState, looksam_perturb
from sam_optax.microbatching import microbatched
from sam_optax.perturbation import dual_vector, perturbation
from sam_optax.sam import SAMState, sam_perturb

__version__ = "0.2.0"

__all__ = [
    "FSAMState",
    "LookSAMState",
    "SAMState",
    "dual_vector",
    "fsam_perturb",
    "gsam_perturb",
    "looksam_perturb",
    "microbatched",
    "perturbation",
    "rho_schedule_from_learning_rate",
    "sam_perturb",
]
