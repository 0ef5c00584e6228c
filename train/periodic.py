"""The training loop's periodic work as named actions, each deciding for itself when it runs.

    actions = [
        Action("evaluate", Every(epochs=1), evaluate),                  # each epoch, and at the end
        Action("checkpoint", Every(steps=500, epochs=1), save),
        Action("plot", AtMostEvery(Every(epochs=1), seconds=30), plot),
    ]
    for step ...:
        run(actions, Moment(step, epoch, epoch_end, last))

clu's `periodic_actions` in a few lines (clu is not a dependency of this project): the loop steps
and says where it is; the actions, in their order, do the rest.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Moment:
    """Where the loop is: `step` steps done, the last of them in epoch `epoch` (from 1)."""

    step: int
    epoch: int
    epoch_end: bool  # the step ends its epoch
    last: bool  # the run stops after this step


When = Callable[[Moment], bool]


@dataclasses.dataclass(frozen=True)
class Every:
    """Every `steps` steps (one number or several), at the end of every `epochs` epochs, and
    (`last`) at the run's last step."""

    steps: int | tuple[int, ...] = ()
    epochs: int | None = None
    last: bool = True

    def __call__(self, moment: Moment) -> bool:
        steps = self.steps if isinstance(self.steps, tuple) else (self.steps,)
        return (
            (self.last and moment.last)
            or any(moment.step % n == 0 for n in steps)
            or (self.epochs is not None and moment.epoch_end and moment.epoch % self.epochs == 0)
        )


@dataclasses.dataclass
class AtMostEvery:
    """When `when` says, but not again within `seconds` of the last time."""

    when: When
    seconds: float
    _last: float = -math.inf

    def __call__(self, moment: Moment) -> bool:
        if not self.when(moment) or time.perf_counter() - self._last < self.seconds:
            return False
        self._last = time.perf_counter()
        return True


@dataclasses.dataclass(frozen=True)
class Action:
    """`run(moment)` whenever `when(moment)`; `name` says what it is in a list of them."""

    name: str
    when: When
    run: Callable[[Moment], object]

    def __call__(self, moment: Moment) -> None:
        if self.when(moment):
            self.run(moment)


def run(actions: Iterable[Action], moment: Moment) -> None:
    """Each action of `actions` in order, those whose time it is."""
    for action in actions:
        action(moment)
