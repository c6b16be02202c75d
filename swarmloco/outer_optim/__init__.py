"""Pure tensor math of the DiLoCo outer step."""

from swarmloco.outer_optim.nesterov import OuterNesterov, apply_outer_step, build_outer_optimizer

__all__ = ["OuterNesterov", "apply_outer_step", "build_outer_optimizer"]
