"""``PerseusCallback``: Perseus for PyTorch Lightning, as one callback.

A thin adapter: it turns Lightning's hooks into the events of the framework-free
:class:`~perseus_lightning.runtime.runtime.PerseusRuntime`, which does the work.

* With ``torch.distributed.pipelining``, the LightningModule keeps its schedule in
  ``self.pipeline_schedule``; the callback wraps the schedule's stage objects
  (:class:`~perseus_lightning.integrations.pipelining.StageInstrumentation`), so every forward,
  backward (and zero-bubble input/weight backward) is an instruction.
* Otherwise (one device, DDP, FSDP) each rank is one stage: a dataloader batch's forward
  (batch start to ``on_before_backward``) and backward (to ``on_after_backward``) are the
  instructions of one microbatch, and an iteration is ``accumulate_grad_batches`` batches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from perseus_lightning.core.profile import BACKWARD, FORWARD
from perseus_lightning.core.schedules import Instruction
from perseus_lightning.runtime.config import DEFAULT_CACHE_DIR, PerseusConfig
from perseus_lightning.runtime.runtime import PerseusRuntime

logger = logging.getLogger(__name__)

SCHEDULE_ATTRIBUTE = "pipeline_schedule"


class PerseusCallback(Callback):
    """Remove energy bloat from training: profile in situ, plan, and set GPU clocks per instruction.

    Args:
        mode: ``"apply"`` (profile, plan and set clocks), ``"observe"`` (measure and log only) or ``"off"``.
        gpu_backend: ``"auto"`` (NVML if there is a driver, else emulated GPUs), ``"nvml"`` or ``"emulated"``.
        cache_dir: where profiles and frontiers are cached (a directory, or one ``.json`` file); ``None`` disables it.
        warmup_iterations: iterations before measuring anything.
        baseline_iterations: iterations measured at max clock, the reference for the saving.
        deploy_iterations: iterations measured right after deploying the plan.
        blocking_power: power (W) of a GPU waiting on communication; ``None`` measures it.
        max_slowdown: the slowest plan considered, as a multiple of the fastest plan's time.
        profiling: ``{"max_clocks": int | None, "iterations_per_clock": int}``.
        straggler: ``{"threshold": float, "patience": int, "recovery": float}``.
        emulation: ``{"time_scale": float, "straggler_ranks": [...], "straggler_slowdown": float,
            "straggler_iterations": [a, b]}`` (emulated GPUs only: their pace against the host's
            work, and those ranks' GPUs throttled).
        log_metrics: log ``perseus/*`` metrics through the Trainer's loggers.

    See ``docs/configuration.md`` for every option; :meth:`from_config` reads them from YAML.
    """

    def __init__(
        self,
        mode: str = "apply",
        gpu_backend: str = "auto",
        cache_dir: str | None = DEFAULT_CACHE_DIR,
        warmup_iterations: int = 2,
        baseline_iterations: int = 3,
        deploy_iterations: int = 3,
        blocking_power: float | None = None,
        max_slowdown: float = 1.2,
        profiling: dict[str, Any] | None = None,
        straggler: dict[str, Any] | None = None,
        emulation: dict[str, Any] | None = None,
        log_metrics: bool = True,
    ) -> None:
        options: dict[str, Any] = {
            "mode": mode, "gpu_backend": gpu_backend, "cache_dir": cache_dir, "warmup_iterations": warmup_iterations,
            "baseline_iterations": baseline_iterations, "deploy_iterations": deploy_iterations,
            "blocking_power": blocking_power, "max_slowdown": max_slowdown,
        }
        for section, value in (("profiling", profiling), ("straggler", straggler), ("emulation", emulation)):
            if value is not None:
                options[section] = value
        self._init_from(PerseusConfig.from_mapping(options, source="PerseusCallback"), log_metrics)

    @classmethod
    def from_config(cls, path: str | Path, log_metrics: bool = True, **overrides: Any) -> PerseusCallback:
        """A callback configured by a YAML file (the same schema as the Accelerate integration's),
        with keyword ``overrides`` on top."""
        config = PerseusConfig.from_yaml(path)
        if overrides:
            config = config.replace(**overrides)
        callback = cls.__new__(cls)
        callback._init_from(config, log_metrics)
        return callback

    def _init_from(self, config: PerseusConfig, log_metrics: bool) -> None:
        self.config = config
        self.log_metrics = log_metrics
        self.runtime: PerseusRuntime | None = None
        self._instrumentations: list[Any] = []
        self._pipelined = False
        self._pending_state: dict[str, Any] | None = None
        self._microbatch = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.config.mode)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.config.mode == "off":
            return
        from perseus_lightning.integrations.torch_device import runtime_for_device
        from perseus_lightning.runtime.cache import model_signature

        self.runtime = runtime_for_device(
            self.config, pl_module.device, trainer.local_rank,
            model_signature=model_signature((name, tuple(p.shape)) for name, p in pl_module.named_parameters()),
            warn=rank_zero_warn,
        )
        if self._pending_state is not None:
            self.runtime.load_state_dict(self._pending_state)
        self.runtime.start()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.runtime is None:
            return
        schedule = getattr(pl_module, SCHEDULE_ATTRIBUTE, None)
        if schedule is None:
            return
        from perseus_lightning.integrations.pipelining import instrument_schedule

        runtime, owner = self.runtime, f"{type(pl_module).__name__}.{SCHEDULE_ATTRIBUTE}"
        self._instrumentations = instrument_schedule(schedule, runtime.instruction_begin, runtime.instruction_end, owner)
        runtime.schedule_name = type(schedule).__name__
        self._pipelined = True

    # ------------------------------------------------------------- iterations
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.runtime is None:
            return
        microbatch = batch_idx % trainer.accumulate_grad_batches
        if microbatch == 0 or self._pipelined:
            self.runtime.iteration_begin()
        if not self._pipelined:
            self.runtime.instruction_begin(Instruction(0, FORWARD, microbatch))
        self._microbatch = microbatch

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        if self.runtime is not None and not self._pipelined:
            self.runtime.instruction_end(Instruction(0, FORWARD, self._microbatch))
            self.runtime.instruction_begin(Instruction(0, BACKWARD, self._microbatch))

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.runtime is not None and not self._pipelined:
            self.runtime.instruction_end(Instruction(0, BACKWARD, self._microbatch))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.runtime is None:
            return
        last_of_epoch = trainer.num_training_batches != float("inf") and batch_idx + 1 >= trainer.num_training_batches
        if not (self._pipelined or (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or last_of_epoch):
            return
        metrics = self.runtime.iteration_end()
        if self.log_metrics and metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.runtime is not None:
            self.runtime.epoch_end()

    # ------------------------------------------------------------------ results
    def announce_straggler(self, slowdown: float | None) -> None:
        """Tell Perseus a data-parallel pipeline is ``slowdown`` times slower (``None``: recovered).

        Call it on every rank at the same iteration (e.g. from a hook all ranks run).
        """
        if self.runtime is not None:
            self.runtime.announce_straggler(slowdown)

    def summary(self) -> dict[str, Any]:
        """Measured baseline vs deployed time and energy, saving, profiling cost and plan (same on every rank)."""
        if self.runtime is not None:
            return self.runtime.summary()
        return {"mode": self.config.mode, "phase": "off"}

    def state_dict(self) -> dict[str, Any]:
        return self.runtime.state_dict() if self.runtime is not None else dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict
        if self.runtime is not None:
            self.runtime.load_state_dict(state_dict)

    # ---------------------------------------------------------------- clean-up
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        for instrumentation in self._instrumentations:
            instrumentation.remove()
        self._instrumentations = []
        if self.runtime is not None:
            self.runtime.close()
