"""A peer's place in a swarm: its identity and its DHT node, for one or more :class:`~swarmloco.DiLoCo` runs.

    with swarmloco.Swarm("my-run", initial_peers=["/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."]) as swarm:
        diloco = swarmloco.DiLoCo(swarm, model, partial(torch.optim.AdamW, lr=3e-4), inner_steps=100)
        ...

Starting a swarm starts hivemind's DHT process and its p2pd daemon, running with this peer's Ed25519 key
(so its libp2p peer id inlines the public key that signs its records). Those processes lead process groups
of their own and die with this one (``PR_SET_PDEATHSIG``; :mod:`swarmloco.protocol.processes`): a signal to
this process's group (a terminal's Ctrl-C) reaches only it, and it decides when they stop.
:meth:`Swarm.close` (or leaving the ``with`` block) stops every averager a :class:`~swarmloco.DiLoCo`
opened on it, then the DHT node.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

from swarmloco.config import SwarmConfig
from swarmloco.protocol.identity import Identity, load_identity, p2pd_key_file

logger = logging.getLogger(__name__)


class Swarm:
    """The DHT node of one peer (see the module doc). ``initial_peers`` empty starts a new swarm."""

    def __init__(self, run_id: str = "swarmloco", *, initial_peers: Sequence[str] | None = None,
                 host_maddrs: Sequence[str] | None = None, identity: Identity | str | Path | None = None,
                 config: SwarmConfig | None = None, stop: threading.Event | None = None, **swarm_fields: Any):
        """``identity``: an :class:`Identity`, or a key file (created if missing), or None for a fresh key.
        ``config`` and ``swarm_fields`` set any :class:`~swarmloco.config.SwarmConfig` field (timeouts,
        min_peers, ...). ``stop``: an event that ends training loops on this swarm (set it from a signal
        handler)."""
        cfg = config or SwarmConfig()
        overrides = dict(swarm_fields)
        if initial_peers is not None:
            overrides["initial_peers"] = tuple(initial_peers)
        if host_maddrs is not None:
            overrides["host_maddrs"] = tuple(host_maddrs)
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self.run_id = run_id
        self.stop = stop or threading.Event()
        if isinstance(identity, Identity):
            self.identity = identity
        else:
            self.identity = load_identity(str(identity) if identity else self.config.identity_path)
        self.dht = None
        self._transports: list[Any] = []

    @classmethod
    def join(cls, *initial_peers: str, run_id: str = "swarmloco", **kwargs: Any) -> Swarm:
        """A started swarm node joined through ``initial_peers``."""
        return cls(run_id, initial_peers=list(initial_peers), **kwargs).start()

    # ----- lifecycle ------------------------------------------------------------------------------
    def start(self, dht: Any = None) -> Swarm:
        """Start the DHT node (or adopt ``dht``, one already started with this identity's key)."""
        if self.dht is not None:
            return self
        if dht is not None:
            self.dht = dht
            return self
        from swarmloco.protocol.transport import start_dht

        # (start_dht forks hivemind's processes into process groups of their own, dying with us)
        with tempfile.TemporaryDirectory(prefix="swarmloco-key-") as keydir:  # p2pd reads the key once
            self.dht = start_dht(self.config, identity_path=p2pd_key_file(self.identity, keydir), stop=self.stop)
        return self

    @property
    def peer_id(self) -> str:
        return self.identity.libp2p_peer_id()

    def visible_maddrs(self) -> list[str]:
        """Where others reach this peer (pass one as their ``initial_peers``)."""
        return [str(m) for m in self.dht.get_visible_maddrs()] if self.dht is not None else []

    def transport_for(self, manifest, templates, codec, clip_factor: float):
        """An averager for one run on this swarm's DHT node (:class:`~swarmloco.DiLoCo` opens it)."""
        from swarmloco.protocol.transport import SwarmTransport

        self.start()
        transport = SwarmTransport(self.config, prefix=manifest.key_prefix, templates=templates, codec=codec,
                                   record_validators=[manifest.validator()], clip_factor=clip_factor,
                                   dht=self.dht, own_dht=False, stopping=self.stop)
        self._transports.append(transport)
        return transport

    def close(self) -> None:
        """Stop every averager opened on this swarm, then the DHT node and p2pd."""
        for transport in self._transports:
            transport.shutdown()
        self._transports.clear()
        dht, self.dht = self.dht, None
        if dht is None:
            return
        from swarmloco.protocol.transport import shutdown_dht

        shutdown_dht(dht)  # (and kills whatever is left of its process group)

    def __enter__(self) -> Swarm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Swarm"]
