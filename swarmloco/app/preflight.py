"""Everything a peer is given, checked before anything starts.

The CLI refuses bad input in one line that names the flag or field as the user wrote it, with the
exit code of docs/operating.md (2: bad flag, config or data; 1: could not start, e.g. a port is taken), *before*
the DHT node and its p2pd start and before a join address is printed: a user should not watch a peer
come up, print where others can join, and then die on a typo. Each check raises :class:`Refused`.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

import torch

from swarmloco.config import RunConfig
from swarmloco.maddrs import parse_maddr

EXIT_ERROR, EXIT_CONFIG = 1, 2


class Refused(Exception):
    """An input the peer cannot run with: ``str()`` is the one line to print, ``exit_code`` the code."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG):
        super().__init__(message)
        self.exit_code = exit_code


def check_device(requested: str) -> None:
    """``--device``: a device type torch knows and this machine has."""
    if requested == "auto":
        return
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise Refused(f"--device {requested}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise Refused(f"--device {requested}: {why} on this machine; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise Refused(f"--device {requested}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    try:
        torch.empty(1, device=device)
    except Exception:  # noqa: BLE001 - mps on Linux, xpu without drivers, ...
        raise Refused(f"--device {requested}: not available on this machine; use auto, cpu or cuda") from None


def check_key_path(path: str, flag: str = "--identity") -> None:
    """A key file to read, or to create: an existing file, or a name in an existing, writable folder."""
    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise Refused(f"{flag} {path}: is a directory; give a key file (made with: swarmloco keygen PATH)")
    if p.exists():
        if not os.access(p, os.R_OK):
            raise Refused(f"{flag} {path}: cannot read it")
        return
    parent = p.parent
    if not parent.is_dir():
        raise Refused(f"{flag} {path}: the folder {parent} does not exist (create it, or give another path)")
    if not os.access(parent, os.W_OK):
        raise Refused(f"{flag} {path}: cannot create a key file in {parent}")


def check_writable_dir(path: str, flag: str) -> None:
    """A directory this peer will write to: it exists or can be made, and a file can be created in it."""
    if not path:
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise Refused(f"{flag} {path}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Refused(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def check_log_file(path: str | None) -> None:
    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise Refused(f"--log-file {path}: is a directory")
    if not p.parent.is_dir():
        raise Refused(f"--log-file {path}: the folder {p.parent} does not exist")
    if (p.exists() and not os.access(p, os.W_OK)) or (not p.exists() and not os.access(p.parent, os.W_OK)):
        raise Refused(f"--log-file {path}: cannot write it")


def check_port_free(port: int, flag: str, host: str = "127.0.0.1") -> None:
    """A TCP port this process will listen on (e.g. ``--status-port``) is free (exit 1 if taken)."""
    if not port:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is taken (another swarmloco peer on this machine?)" if e.errno == errno.EADDRINUSE else \
                f"cannot be used ({e.strerror or e})"
            raise Refused(f"{flag} {port} {why}: pick another {flag} (or 0: off)", EXIT_ERROR) from None


def check_listen_maddrs(maddrs: tuple[str, ...] | list[str], source: str = "--host-maddrs") -> None:
    """The addresses p2pd will listen on (``source``: the flag or field they came from): a fixed port must be
    free (p2pd reuses ports, so a second peer on the same port would otherwise start a second swarm
    there without a word), and the address must be this machine's (exit 1 if not)."""
    for text in maddrs:
        m = parse_maddr(text)
        if m.port is None or m.family not in ("ip4", "ip6"):
            continue
        family = socket.AF_INET if m.family == "ip4" else socket.AF_INET6
        kind = socket.SOCK_STREAM if m.transport == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:  # a port in TIME_WAIT is free; one a socket listens on is not
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((m.host, m.port))
            except OSError as e:
                free = text.replace(f"/{m.transport}/{m.port}", f"/{m.transport}/0", 1)
                if e.errno == errno.EADDRINUSE:
                    raise Refused(f"port {m.port} is taken ({source} {text}; another swarmloco peer on this machine?): "
                                  f"use --host-maddrs {free} for a free port, or another port", EXIT_ERROR) from None
                if e.errno == errno.EADDRNOTAVAIL:
                    wildcard = "0.0.0.0" if m.family == "ip4" else "::"
                    raise Refused(f"{source} {text}: {m.host} is not an address of this machine (listen on "
                                  f"/{m.family}/{wildcard}/{m.transport}/{m.port} and give the public address with "
                                  "--announce-maddrs)", EXIT_ERROR) from None
                if e.errno == errno.EACCES:
                    raise Refused(f"{source} {text}: ports below 1024 need root; use --host-maddrs {free} or a port "
                                  "above 1023", EXIT_ERROR) from None
                raise Refused(f"{source} {text}: cannot listen there ({e.strerror or e})", EXIT_ERROR) from None


def check_peer_options(cfg: RunConfig, *, shard: int | None, inner_steps: int | None,
                       max_outer_steps: int | None, resume: bool) -> None:
    """The per-peer flags against the run's config."""
    if inner_steps is not None and inner_steps < 1:
        raise Refused(f"--inner-steps {inner_steps}: must be >= 1 (inner steps per outer step)")
    if max_outer_steps is not None and max_outer_steps < 1:
        raise Refused(f"--max-outer-steps {max_outer_steps}: must be >= 1")
    if shard is not None and not 0 <= shard < cfg.data.num_shards:
        raise Refused(f"--shard {shard}: out of range; this run has data.num_shards = {cfg.data.num_shards} "
                      f"(shards 0 to {cfg.data.num_shards - 1})")
    if resume and not cfg.checkpoint.dir:
        raise Refused("--resume needs a checkpoint directory: --checkpoint-dir DIR (or checkpoint.dir)")


def check_codec(cfg: RunConfig) -> None:
    """The codec builds with this config (codec-specific limits, e.g. a block size it cannot use)."""
    from swarmloco.compression import get_codec

    try:
        get_codec(cfg.codec)
    except ValueError as e:
        raise Refused(str(e).removeprefix("swarmloco: ")) from None


def load_corpus(cfg: RunConfig):
    """The run's corpus (after ``prepare_config``), read now: ``data.path`` problems are bad input, exit 2
    before the DHT node starts."""
    from swarmloco.data import build_corpus

    try:
        corpus = build_corpus(cfg.data, cfg.model.block_size, cfg.seed)
    except ValueError as e:
        raise Refused(str(e)) from None
    except OSError as e:
        raise Refused(f"data.path = {cfg.data.path!r}: cannot read it ({e.strerror or e})") from None
    vocab = getattr(corpus, "vocab_size", None)
    if cfg.model.kind == "gpt" and isinstance(vocab, int) and cfg.model.vocab_size < vocab:
        raise Refused(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary ({vocab} "
                      f"tokens): token ids past {cfg.model.vocab_size - 1} would have no embedding")
    return corpus


__all__ = ["Refused", "check_codec", "check_device", "check_key_path", "check_listen_maddrs", "check_log_file",
           "check_peer_options", "check_port_free", "check_writable_dir", "load_corpus"]
