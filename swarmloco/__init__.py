"""swarmloco: DiLoCo training across the internet on volunteers' machines.

The public API (everything else stays importable from its module, but is not promised)::

    import swarmloco
    with swarmloco.Swarm("my-run", initial_peers=[...]) as swarm:
        diloco = swarmloco.DiLoCo(swarm, model, functools.partial(torch.optim.AdamW, lr=3e-4), inner_steps=100)
        for x, y in loader:
            loss = loss_fn(model(x), y); loss.backward()
            diloco.inner_optimizer.step(); diloco.inner_optimizer.zero_grad()
            diloco.step(samples=len(x), loss=loss)
        diloco.close()
"""

from swarmloco.config import AccessConfig, CheckpointConfig, CodecConfig, OuterConfig, SwarmConfig
from swarmloco.node.diloco import DiLoCo
from swarmloco.node.membership import AccessRefused
from swarmloco.node.round import RoundReport
from swarmloco.node.swarm import Swarm
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.manifest import ManifestMismatch
from swarmloco.protocol.interface import TransportDied

__version__ = "0.1.0"
__all__ = ["AccessConfig", "AccessRefused", "CheckpointConfig", "CodecConfig", "DiLoCo", "Identity",
           "ManifestMismatch", "OuterConfig", "RoundReport", "Swarm", "SwarmConfig", "TransportDied", "__version__"]
