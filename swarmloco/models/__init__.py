"""Model kinds the CLI can build from a run config (a Python user brings any ``torch.nn.Module``)."""

from swarmloco.models.gpt import GPT, num_params

__all__ = ["GPT", "num_params"]
