"""Pure tensor math of the DiLoCo outer step."""

from swarmloco.outer_optim.nesterov import OuterNesterov, apply_outer_step

__all__ = ["OuterNesterov", "apply_outer_step"]
