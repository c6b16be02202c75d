"""The CLI and its built-in peer: clients of the public API (``swarmloco.Swarm``, ``swarmloco.DiLoCo``)."""
