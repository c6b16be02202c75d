"""swarmloco: DiLoCo training across the internet on volunteers' machines."""

__version__ = "0.1.0"
