"""``PerseusPlugin``: Perseus for Hugging Face Accelerate, enabled by a config file.

A thin adapter: it turns the training loop's events into those of the framework-free
:class:`~perseus_lightning.runtime.runtime.PerseusRuntime`, which does the work. Accelerate's
config file rejects unknown keys and ``Accelerator`` unknown kwargs handlers, so Perseus is
enabled by ``PERSEUS_CONFIG=perseus.yaml`` (which reaches every worker of ``accelerate launch``),
or by ``perseus launch --perseus-config perseus.yaml ...``, which sets it::

    accelerator = Accelerator()
    perseus = PerseusPlugin.from_env(accelerator)  # does nothing unless PERSEUS_CONFIG is set
    for batch in dataloader:
        with accelerator.accumulate(model), perseus.step():
            accelerator.backward(model(batch).loss)
            optimizer.step()
            optimizer.zero_grad()
    accelerator.end_training()  # restores the GPU clocks

* Without pipelining (one device, DDP, FSDP), each rank is one stage: each ``step()`` is one
  microbatch, whose forward runs from the step's start to ``accelerator.backward`` and whose
  backward is that call; the iteration ends with the step where ``accelerator.sync_gradients``
  is true (gradient accumulation).
* With ``torch.distributed.pipelining``, :meth:`PerseusPlugin.attach` wraps the schedule's stage
  objects (:class:`~perseus_lightning.integrations.pipelining.StageInstrumentation`), and each
  ``step()`` is one iteration (one ``schedule.step``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from perseus_lightning.core.profile import BACKWARD, FORWARD
from perseus_lightning.core.schedules import Instruction
from perseus_lightning.runtime.config import ConfigError, PerseusConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from perseus_lightning.integrations.pipelining import StageInstrumentation
    from perseus_lightning.runtime.runtime import PerseusRuntime

ENV_CONFIG = "PERSEUS_CONFIG"
"""The environment variable that names the Perseus YAML file (unset or empty: Perseus is off)."""
STATE_VERSION = 1
_DISABLED: AbstractContextManager[None] = contextlib.nullcontext()


class PerseusPlugin:
    """Remove energy bloat from an Accelerate training loop: profile in situ, plan, and set GPU clocks.

    Args:
        accelerator: the script's ``Accelerator`` (its process group must exist, as it does once
            the ``Accelerator`` is built).
        config: a :class:`~perseus_lightning.runtime.config.PerseusConfig` or the path of its YAML
            file (the schema of ``docs/configuration.md``); ``None`` or ``mode: off``: the plugin does
            nothing (no GPU opened, no hook, no thread).
        log_metrics: log the ``perseus/*`` metrics through ``accelerator.log`` (the trackers).
        checkpointing: register the plugin with ``accelerator.register_for_checkpointing``, so
            that ``save_state``/``load_state`` carry the profile and plan (a resumed run neither
            profiles nor plans again). Registered even when disabled, so that checkpoints of runs
            with and without Perseus stay interchangeable.

    When enabled, the plugin replaces ``accelerator.backward`` (to see each microbatch's forward
    and backward) and ``accelerator.end_training`` (to close) on this instance, until :meth:`close`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        config: PerseusConfig | str | os.PathLike[str] | None = None,
        *,
        log_metrics: bool = True,
        checkpointing: bool = True,
    ) -> None:
        if isinstance(config, (str, os.PathLike)):
            config = PerseusConfig.from_yaml(config)
        self.accelerator = accelerator
        self.config = config
        self.log_metrics = log_metrics
        self.runtime: PerseusRuntime | None = None
        self.iteration = 0
        """Training iterations (optimizer steps) completed; restored from checkpoints; the log step."""
        self._instrumentations: list[StageInstrumentation] = []
        self._replaced: dict[str, tuple[Any, Any]] = {}  # name: (the original, the instance attribute it shadowed)
        self._in_iteration = False
        self._forward: Instruction | None = None  # the running forward, when not pipelined
        self._microbatch = 0
        if checkpointing:
            accelerator.register_for_checkpointing(self)
        if config is not None and config.mode != "off":
            self._start(config)

    @classmethod
    def from_env(
        cls, accelerator: Accelerator, *, log_metrics: bool = True, checkpointing: bool = True, **overrides: Any
    ) -> PerseusPlugin:
        """The plugin configured by the YAML file named by ``$PERSEUS_CONFIG``, with keyword
        ``overrides`` on top; disabled when the variable is unset or empty.

        Raises :class:`~perseus_lightning.runtime.config.ConfigError` (naming the file, the key and
        the fix) for a missing or invalid file.
        """
        path = os.environ.get(ENV_CONFIG, "").strip()
        config = None
        if path:
            try:
                config = PerseusConfig.from_yaml(path)
            except ConfigError as error:
                raise error.relocated(f"{ENV_CONFIG}={path}", "") from None
            if overrides:
                config = config.replace(**overrides)
        return cls(accelerator, config, log_metrics=log_metrics, checkpointing=checkpointing)

    def _start(self, config: PerseusConfig) -> None:
        from perseus_lightning.integrations.torch_device import runtime_for_device

        accelerator = self.accelerator
        self.runtime = runtime_for_device(config, accelerator.device, accelerator.local_process_index)
        self.runtime.start()
        for name, method in (("backward", self._backward), ("end_training", self._end_training)):
            self._replaced[name] = (getattr(accelerator, name), vars(accelerator).get(name))
            setattr(accelerator, name, method)

    @property
    def enabled(self) -> bool:
        """Whether Perseus runs (a config was given, its mode is not ``off``, and it is not closed)."""
        return self.runtime is not None and self.runtime.active

    # ------------------------------------------------------------------ set-up
    def attach(self, schedule: Any) -> None:
        """Observe a ``torch.distributed.pipelining`` schedule: every forward, backward (and
        zero-bubble input/weight backward) of its stages is an instruction, and each :meth:`step`
        one iteration. Call it on every rank, before training."""
        if self.runtime is None:
            return
        from perseus_lightning.integrations.pipelining import instrument_schedule

        runtime = self.runtime
        self._instrumentations += instrument_schedule(
            schedule, runtime.instruction_begin, runtime.instruction_end, "PerseusPlugin.attach"
        )
        runtime.schedule_name = type(schedule).__name__

    # ------------------------------------------------------------- iterations
    def step(self) -> AbstractContextManager[None]:
        """A context around one training step: a microbatch (``accelerator.backward`` inside), or
        with :meth:`attach`, one pipeline iteration. Enter it on every rank. An exception inside
        closes Perseus (clocks restored) and propagates; once closed, the step is a no-op."""
        return self._step(self.runtime) if self.runtime is not None and self.runtime.active else _DISABLED

    @contextlib.contextmanager
    def _step(self, runtime: PerseusRuntime) -> Iterator[None]:
        if not runtime.model_signature:
            runtime.model_signature = self._model_signature()
        if not self._in_iteration:
            self._in_iteration, self._microbatch = True, 0
            runtime.iteration_begin()
        if not self._instrumentations:
            self._forward = Instruction(0, FORWARD, self._microbatch)
            runtime.instruction_begin(self._forward)
        try:
            yield
        except BaseException:
            self.close()
            raise
        if self._forward is not None:  # no backward in this step
            runtime.instruction_end(self._forward)
            self._forward = None
            self._microbatch += 1
        if self._instrumentations or self.accelerator.sync_gradients:
            self._in_iteration = False
            metrics = runtime.iteration_end()
            self.iteration += 1
            if self.log_metrics and metrics:
                self.accelerator.log(metrics, step=self.iteration)

    def _backward(self, loss: Any, **kwargs: Any) -> Any:
        """``accelerator.backward``: ends the running microbatch's forward and times its backward."""
        backward, forward, runtime = self._replaced["backward"][0], self._forward, self.runtime
        if forward is None or runtime is None:  # outside step(), or a second backward in one step
            return backward(loss, **kwargs)
        self._forward = None
        instruction = Instruction(0, BACKWARD, forward.microbatch)
        runtime.instruction_end(forward)
        runtime.instruction_begin(instruction)
        result = backward(loss, **kwargs)
        runtime.instruction_end(instruction)
        self._microbatch += 1
        return result

    def _model_signature(self) -> str:
        """A hash of the parameter shapes of the attached stages, else of the prepared models."""
        from perseus_lightning.runtime.cache import model_signature

        modules = [i.stage.submod for i in self._instrumentations] or list(getattr(self.accelerator, "_models", []))
        return model_signature(
            (f"{k}.{name}", tuple(p.shape)) for k, module in enumerate(modules) for name, p in module.named_parameters()
        )

    # ------------------------------------------------------------------ results
    def announce_straggler(self, slowdown: float | None) -> None:
        """Tell Perseus a data-parallel pipeline is ``slowdown`` times slower (``None``: recovered).

        Call it on every rank at the same iteration.
        """
        if self.runtime is not None:
            self.runtime.announce_straggler(slowdown)

    def summary(self) -> dict[str, Any]:
        """Measured baseline vs deployed time and energy, saving, profiling cost and plan (same on every rank)."""
        if self.runtime is not None:
            return self.runtime.summary()
        return {"mode": self.config.mode if self.config is not None else "off", "phase": "off"}

    def state_dict(self) -> dict[str, Any]:
        """The completed iterations and the runtime's state: measurements and the frontier, which
        holds every rank's plan, so the main process's checkpoint file is complete."""
        if self.runtime is None:
            return {}
        return {"version": STATE_VERSION, "iteration": self.iteration, "runtime": self.runtime.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (call ``accelerator.load_state`` before training); a state
        saved without Perseus, or loaded while it is disabled, is ignored."""
        if self.runtime is None or not state_dict:
            return
        self.iteration = int(state_dict.get("iteration", 0))
        self.runtime.load_state_dict(state_dict.get("runtime", {}))

    # ---------------------------------------------------------------- clean-up
    def close(self) -> None:
        """Restore the GPU clocks and the accelerator's methods, stop the helper threads (idempotent)."""
        for instrumentation in self._instrumentations:
            instrumentation.remove()
        self._instrumentations = []
        for name, (_, previous) in self._replaced.items():
            if previous is None:
                vars(self.accelerator).pop(name, None)
            else:
                setattr(self.accelerator, name, previous)
        self._replaced = {}
        self._forward = None
        if self.runtime is not None:
            self.runtime.close()

    def _end_training(self) -> None:
        """``accelerator.end_training``, after closing Perseus (while the process group still exists)."""
        self.close()
        self.accelerator.end_training()

    def __repr__(self) -> str:
        state = f"phase={self.runtime.phase!r}" if self.runtime is not None else "disabled"
        return f"{type(self).__name__}({state})"

