"""``Adam``, ``AdamW`` and ``Adamax`` with the tf_keras 2.21 keyword arguments.

Keyword arguments shared by all three (documented once):
    learning_rate: float, ``ireeopt.schedules`` schedule, or a zero-argument callable
        (called every step).  Default 0.001.
    weight_decay: decoupled decay ``var -= var * wd * lr`` before the update (None/0: off).
    clipnorm / global_clipnorm / clipvalue: gradient clipping; at most one may be set.
    use_ema, ema_momentum (0.99), ema_overwrite_frequency: moving average of the weights.
    jit_compile: True runs the IREE-compiled step; False runs the same kernels op by op
        in JAX on the host (a debugging reference).
    name: optimizer name.  mesh: not supported yet (NotImplementedError).
"""
from ..kernels import adam, adamax
from .optimizer import Optimizer, _check_number

_DEFAULT_LR = 0.001


class Adam(Optimizer):
    """Adam (spec §2).  ``epsilon`` is "epsilon hat"; ``adaptive_epsilon=True`` gives the
    paper's Algorithm 1 exactly.  ``amsgrad`` keeps the running maximum ``vhat`` of ``v``."""

    _kind = "adam"
    _config_keys = ("beta_1", "beta_2", "epsilon", "amsgrad", "adaptive_epsilon")

    def __init__(self, learning_rate=_DEFAULT_LR, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None, use_ema=False,
                 ema_momentum=0.99, ema_overwrite_frequency=None, jit_compile=True, name=None, mesh=None,
                 adaptive_epsilon=False, **kwargs):
        owner = type(self).__name__
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2), ("epsilon", epsilon)):
            _check_number(owner, key, value)
        for key, value in (("amsgrad", amsgrad), ("adaptive_epsilon", adaptive_epsilon)):
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: `{key}` must be a bool, got {value!r}")
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
                         ema_momentum, ema_overwrite_frequency, jit_compile, name, mesh, kwargs)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.amsgrad, self.adaptive_epsilon = amsgrad, adaptive_epsilon

    def _kernel_constants(self, lr):
        return adam.constants(lr, self.beta_1, self.beta_2, self.epsilon, self._iterations,
                              self.adaptive_epsilon)


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.004); identical to ``Adam(weight_decay=x)``."""

    def __init__(self, learning_rate=_DEFAULT_LR, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, clipnorm=None, clipvalue=None, global_clipnorm=None, use_ema=False,
                 ema_momentum=0.99, ema_overwrite_frequency=None, jit_compile=True, name=None, mesh=None,
                 adaptive_epsilon=False, **kwargs):
        if weight_decay is None:
            raise ValueError("AdamW: `weight_decay` cannot be None; pass a float (0 turns decay off)")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay, clipnorm, clipvalue,
                         global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency, jit_compile, name,
                         mesh, adaptive_epsilon, **kwargs)


class Adamax(Optimizer):
    """The legacy tf_keras Adamax (spec §4).  Also takes ``lr`` (alias of
    ``learning_rate``; giving both is an error) and ``decay`` (inverse-time decay of the rate)."""

    _kind = "adamax"
    _config_keys = ("beta_1", "beta_2", "epsilon", "decay")
    _legacy = True

    def __init__(self, learning_rate=None, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None,
                 clipnorm=None, clipvalue=None, global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, jit_compile=True, name=None, mesh=None, decay=0.0, lr=None,
                 **kwargs):
        owner = type(self).__name__
        if lr is not None and learning_rate is not None:
            raise ValueError("Adamax: give either `learning_rate` or its alias `lr`, not both")
        learning_rate = lr if lr is not None else (_DEFAULT_LR if learning_rate is None else learning_rate)
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2), ("epsilon", epsilon), ("decay", decay)):
            _check_number(owner, key, value)
        if decay < 0:
            raise ValueError(f"Adamax: `decay` must be >= 0, got {decay}")
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
                         ema_momentum, ema_overwrite_frequency, jit_compile, name, mesh, kwargs)
        self.beta_1, self.beta_2, self.epsilon, self.decay = beta_1, beta_2, epsilon, decay

    def _step_lr(self):
        return adamax.decayed_lr(self._current_learning_rate(), self.decay, self._iterations)

    def _kernel_constants(self, lr):
        return adamax.constants(lr, self.beta_1, self.beta_2, self.epsilon, self._iterations)
