"""Data kinds the CLI can build from a run config: token streams cut into shards and a held-out set."""

from swarmloco.data.text import Corpus, shard_for_peer

__all__ = ["Corpus", "shard_for_peer"]
