"""Pure tensor math of the DiLoCo outer step, and its settings."""

from swarmloco.outer_optim.config import OuterConfig
from swarmloco.outer_optim.nesterov import OuterNesterov, apply_outer_step, build_outer_optimizer

__all__ = ["OuterConfig", "OuterNesterov", "apply_outer_step", "build_outer_optimizer"]
