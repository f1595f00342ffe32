"""Record the compute instructions a ``torch.distributed.pipelining`` stage actually executes.

:class:`StageInstrumentation` wraps one stage object's ``forward_one_chunk``,
``backward_one_chunk`` and ``backward_weight_one_chunk`` (on the instance, not the class), so
every schedule that drives the stage is observed, whatever its ``pipeline_order`` says.
Trust the observed calls: in torch 2.13, ``Schedule1F1B.pipeline_order`` mislabels the last
rank's microbatch ids, while the calls carry the ids the stage really runs.

The wrappers only append to a list and call the optional callbacks; they add no device
synchronisation.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Any

from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD
from perseus_lightning.core.schedules import Instruction

InstructionCallback = Callable[[Instruction], None]
_INSTRUMENTED_METHODS: tuple[str, ...] = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")


class StageInstrumentation:
    """Observe the compute instructions of one pipeline stage, in execution order.

    ``stage`` is a ``PipelineStage`` (any object with ``stage_index`` and the three
    ``*_one_chunk`` methods). ``on_begin`` and ``on_end`` are called with the
    :class:`Instruction` right before and right after it runs; ``on_end`` is skipped if the
    method raises. Use as a context manager, or call :meth:`remove` to restore the stage.
    """

    def __init__(
        self,
        stage: Any,
        on_begin: InstructionCallback | None = None,
        on_end: InstructionCallback | None = None,
    ) -> None:
        self.stage = stage
        self.on_begin = on_begin
        self.on_end = on_end
        self.executed: list[Instruction] = []
        self._replaced: dict[str, Any] | None = {name: vars(stage).get(name) for name in _INSTRUMENTED_METHODS}
        for name in _INSTRUMENTED_METHODS:
            setattr(stage, name, self._wrap(name, getattr(stage, name)))

    def remove(self) -> None:
        """Restore the stage's methods as they were; :attr:`executed` is kept. Safe to call twice."""
        if self._replaced is None:
            return
        for name, previous in self._replaced.items():
            if previous is None:
                delattr(self.stage, name)
            else:
                setattr(self.stage, name, previous)
        self._replaced = None

    def __enter__(self) -> StageInstrumentation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(method)

        @functools.wraps(method)
        def instrumented(*args: Any, **kwargs: Any) -> Any:
            instruction = self._instruction(name, signature.bind(*args, **kwargs))
            if self.on_begin is not None:
                self.on_begin(instruction)
            result = method(*args, **kwargs)
            self.executed.append(instruction)
            if self.on_end is not None:
                self.on_end(instruction)
            return result

        return instrumented

    def _instruction(self, name: str, call: inspect.BoundArguments) -> Instruction:
        """The instruction of one call; the microbatch id is the first argument (``*_chunk_id``)."""
        microbatch = next(iter(call.arguments.values()))
        if name == "forward_one_chunk":
            kind = FORWARD
        elif name == "backward_weight_one_chunk":
            kind = BACKWARD_WEIGHT
        else:
            kind = BACKWARD if call.arguments.get("full_backward", True) else BACKWARD_INPUT
        return Instruction(stage=self.stage.stage_index, kind=kind, microbatch=int(microbatch))


def instrument_schedule(
    schedule: Any, on_begin: InstructionCallback, on_end: InstructionCallback, owner: str
) -> list[StageInstrumentation]:
    """Instrument every stage a ``torch.distributed.pipelining`` schedule drives on this rank.

    ``owner`` names the caller in the error raised for an object whose stages cannot be seen.
    """
    from perseus_lightning.runtime.config import ConfigError

    stages = getattr(schedule, "_stages", None) or ([schedule._stage] if hasattr(schedule, "_stage") else [])
    if not stages:
        raise ConfigError(
            owner, None, f"Perseus cannot see the pipeline stages of {type(schedule).__name__}",
            "use a torch.distributed.pipelining schedule (PipelineScheduleSingle or PipelineScheduleMulti)",
        )
    return [StageInstrumentation(stage, on_begin, on_end) for stage in stages]
