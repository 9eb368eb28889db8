"""The transformers Trainer adapter: run any prunekit training callback inside ``transformers.Trainer``.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[PruningTrainerCallback(GradualPruning(model, final_sparsity=0.5, end_step=1000))])

Trainer events map onto the PruningCallback hooks: on_train_begin, on_step_end(state.global_step) after every
optimizer step, on_epoch_end(epochs completed) and on_train_end. Masks stay enforced through the Trainer's optimizer
(the mask engine hooks every torch optimizer, also inside accelerate's wrapper). This module imports transformers;
``prunekit.training`` loads it only when PruningTrainerCallback is asked for, so transformers stays optional.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..errors import ArgumentError

_HOOKS = ("on_train_begin", "on_step_end", "on_epoch_end", "on_train_end")


class PruningTrainerCallback(TrainerCallback):
    """Wrap prunekit callbacks (GradualPruning, PruneAtInit, LotteryTicket, or any object with the hooks).

    Several callbacks can share one adapter; they run in the order given (the Trainer warns about two instances of
    one callback class).
    """

    def __init__(self, callback: Any, *more: Any) -> None:
        for i, item in enumerate((callback, *more)):
            if not any(callable(getattr(item, hook, None)) for hook in _HOOKS):
                raise ArgumentError("callback" if i == 0 else f"more[{i - 1}]", type(item).__name__,
                                    "an object with PruningCallback hooks (" + ", ".join(_HOOKS) + ")")
        self.callbacks = (callback, *more)

    @property
    def callback(self) -> Any:
        """The first wrapped callback."""
        return self.callbacks[0]

    def _forward(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Before the first step."""
        self._forward("on_train_begin")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After each optimizer step (state.global_step counts them from 1)."""
        self._forward("on_step_end", int(state.global_step))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After each epoch (state.epoch counts the epochs completed)."""
        self._forward("on_epoch_end", int(round(state.epoch or 0)))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After training."""
        self._forward("on_train_end")
