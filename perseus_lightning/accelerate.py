"""Perseus for Hugging Face Accelerate: ``from perseus_lightning.accelerate import PerseusPlugin``.

See :mod:`perseus_lightning.integrations.accelerate` and ``docs/accelerate.md``.
"""

from perseus_lightning.integrations.accelerate import ENV_CONFIG, PerseusPlugin

__all__ = ["ENV_CONFIG", "PerseusPlugin"]
