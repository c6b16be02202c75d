"""Every bad input is refused before anything starts: one line on stderr naming the flag or field as
the user wrote it, the exit code of docs/operating.md (2 bad input, 1 could not start), no traceback, and no DHT
node started (``SWARMLOCO_FAULT=no_dht`` makes any DHT start fail loudly, so a case that got that
far would exit 1 with that message instead)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from swarmloco.app import cli
from swarmloco.config import config_to_dict
from swarmloco.protocol.identity import Identity

from conftest import tiny_config

PEER_ID = Identity.generate().libp2p_peer_id()
MADDR = f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"
OWNER_HEX = "ab" * 32


@pytest.fixture
def files(tmp_path: Path):
    """Paths the cases refer to as {name}."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()

    def config(name: str, text: str | None = None, **sections) -> str:
        """A config file: TINY with ``sections`` merged in, written without validating it."""
        data = config_to_dict(tiny_config())
        for section, values in sections.items():
            data[section].update(values)
        path = tmp_path / name
        path.write_text(text if text is not None else toml_text(data))
        return str(path)

    key = tmp_path / "owner.key"
    Identity.generate().write_libp2p_key(key)
    (tmp_path / "garbage.key").write_bytes(b"\x01\x02not a key")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 400)
    (tmp_path / "tiny.txt").write_text("too small")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00run_id")
    good = config("good.toml")
    paths = {
        "good": good, "dir": str(tmp_path), "missing": str(tmp_path / "missing.toml"),
        "missing_dir": str(tmp_path / "no" / "such" / "dir"), "a_file": str(tmp_path / "a_file"),
        "key": str(key), "garbage_key": str(tmp_path / "garbage.key"), "bad_json": str(tmp_path / "bad.json"),
        "binary_toml": str(tmp_path / "binary.toml"), "taken": str(taken.getsockname()[1]),
        "syntax": config("syntax.toml", "[inner\nsteps = 3\n"),
        "bad_codec": config("codec.toml", codec={"name": "gzip"}),
        "unknown_field": config("unknown.toml", inner={"lrr": 1.0}),
        "bad_beta": config("beta.toml", inner={"beta1": "high"}),
        "bool_int": config("bool.toml", model={"n_layer": True}),
        "nan": config("nan.toml", good_text(good).replace("lr = 0.003", "lr = nan", 1)),
        "small_vocab": config("vocab.toml", model={"vocab_size": 100}),
        "big_block": config("block.toml", codec={"name": "int8", "block_size": 10**9}),
        "private": config("private.toml", access={"private": True}),
        "binary_data": config("bindata.toml", data={"path": str(tmp_path / "blob.bin")}),
        "tiny_data": config("tinydata.toml", data={"path": str(tmp_path / "tiny.txt")}),
        "missing_data": config("nodata.toml", data={"path": str(tmp_path / "nowhere")}),
        "few_bytes": config("shards.toml", data={"max_bytes": 20_000, "num_shards": 8000}),
        "peer_in_file": config("peerfile.toml", swarm={"initial_peers": ["/ip4/127.0.0.1/tcp/5"]}),
        "taken_in_file": config("takenfile.toml", swarm={"host_maddrs": [f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"]}),
    }
    yield paths
    taken.close()


def good_text(path: str) -> str:
    return Path(path).read_text()


def toml_text(data: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


# argv (with {placeholders}), exit code, a fragment the one line must contain
CASES = [
    # argparse: one line, not the whole usage
    ([], 2, "required: COMMAND"),
    (["run"], 2, "required: config"),
    (["run", "{good}", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["run", "{good}", "--shard", "x"], 2, "--shard: invalid int value: 'x'"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    # the config file
    (["run", "{missing}"], 2, "file not found"),
    (["run", "{dir}"], 2, "is a directory"),
    (["run", "{binary_toml}"], 2, "not a text (UTF-8) TOML file"),
    (["run", "{syntax}"], 2, "is not valid TOML"),
    (["run", "{bad_codec}"], 2, 'codec.name = "gzip" is invalid: must be one of'),
    (["run", "{unknown_field}"], 2, "unknown field(s) in [inner]: lrr"),
    (["run", "{bad_beta}"], 2, 'inner.beta1 = "high" is invalid'),
    (["run", "{bool_int}"], 2, "model.n_layer = true is invalid"),
    (["run", "{nan}"], 2, "inner.lr = nan is invalid"),
    (["run", "{small_vocab}"], 2, "model.vocab_size = 100 is smaller than the data's vocabulary (256 tokens)"),
    (["run", "{big_block}"], 2, "codec.block_size"),
    (["run", "{private}"], 2, "access.private needs access.owner"),
    (["run", "{peer_in_file}"], 2, 'swarm.initial_peers = "/ip4/127.0.0.1/tcp/5" is invalid'),
    (["run", "{taken_in_file}"], 1, "is taken"),
    # the data
    (["run", "{binary_data}"], 2, "not a text file (a NUL byte at offset 0)"),
    (["run", "{tiny_data}"], 2, "corpus too small"),
    (["run", "{missing_data}"], 2, "no such file or directory"),
    (["run", "{few_bytes}"], 2, "data.num_shards = 8000"),
    # flags of run, named as typed (not as Python tuples)
    (["run", "{good}", "--inner-steps", "0"], 2, "--inner-steps 0: must be >= 1"),
    (["run", "{good}", "--max-outer-steps", "-1"], 2, "--max-outer-steps -1: must be >= 1"),
    (["run", "{good}", "--shard", "99"], 2, "--shard 99: out of range; this run has data.num_shards = 8"),
    (["run", "{good}", "--min-peers", "0"], 2, "--min-peers 0: must be an integer >= 1"),
    (["run", "{good}", "--status-port", "70000"], 2, "--status-port 70000"),
    (["run", "{good}", "--status-port", "{taken}"], 1, "--status-port {taken} is taken"),
    (["run", "{good}", "--device", "cuda:7"], 2, "--device cuda:7"),
    (["run", "{good}", "--device", "gpu"], 2, "--device gpu: not a device"),
    (["run", "{good}", "--identity", "{missing_dir}/peer.key"], 2, "--identity {missing_dir}/peer.key: the folder"),
    (["run", "{good}", "--identity", "{dir}"], 2, "is a directory"),
    (["run", "{good}", "--identity", "{garbage_key}"], 2, "identity file {garbage_key}: unrecognised key file"),
    (["run", "{good}", "--initial-peers", "peer0"], 2, "--initial-peers peer0: not a usable multiaddr"),
    (["run", "{good}", "--initial-peers", "/ip4/127.0.0.1/tcp/1"], 2, "must end with the peer's id"),
    (["run", "{good}", "--initial-peers", "/ip4/127.0.0.1/tcp/99999/p2p/" + PEER_ID], 2, "not a number from 0 to 65535"),
    (["run", "{good}", "--host-maddrs", "/ip4/1.2.3/tcp/0"], 2, "--host-maddrs /ip4/1.2.3/tcp/0: not a usable"),
    (["run", "{good}", "--host-maddrs", "/ip4/127.0.0.1/tcp/{taken}"], 1,
     "port {taken} is taken (--host-maddrs /ip4/127.0.0.1/tcp/{taken}; another swarmloco peer on this machine?): "
     "use --host-maddrs /ip4/127.0.0.1/tcp/0 for a free port"),
    (["run", "{good}", "--host-maddrs", "/ip4/203.0.113.77/tcp/4001"], 1, "not an address of this machine"),
    (["run", "{good}", "--announce-maddrs", "somewhere"], 2, "--announce-maddrs somewhere"),
    (["run", "{good}", "--checkpoint-dir", "{a_file}"], 2, "--checkpoint-dir {a_file}: exists and is not a directory"),
    (["run", "{good}", "--resume"], 2, "--resume needs a checkpoint directory"),
    (["run", "{good}", "--log-file", "{missing_dir}/peer.log"], 2, "--log-file {missing_dir}/peer.log: the folder"),
    # join: its local flags before its DHT node
    (["join", "peer0"], 2, "MADDR peer0: a multiaddr starts with '/'"),
    (["join", MADDR, "has space"], 2, "RUN has space: bad run name"),
    (["join", MADDR, f"run@{'zz' * 32}"], 2, "bad owner key"),
    (["join", MADDR, "--device", "cuda:7"], 2, "--device cuda:7"),
    (["join", MADDR, "--inner-steps", "0"], 2, "--inner-steps 0"),
    (["join", MADDR, "--status-port", "{taken}"], 1, "is taken"),
    (["join", MADDR, "--manifest-timeout", "-1"], 2, "--manifest-timeout -1.0"),
    # init-run, token, bootstrap, keygen
    (["init-run", "{good}"], 2, "init-run needs --identity OWNER_KEY"),
    (["init-run", "{good}", "--identity", "{missing}"], 2, "--identity {missing}: No such file or directory"),
    (["init-run", "{good}", "--identity", "{key}", "--valid-days", "nan"], 2, "--valid-days nan"),
    (["init-run", "{good}", "--identity", "{key}", "--once"], 2, "--once needs --initial-peers"),
    (["init-run", "{good}", "--identity", "{key}", "--host-maddrs", "/ip4/127.0.0.1/tcp/{taken}"], 1, "is taken"),
    (["token", "{missing}", "run", OWNER_HEX, "--initial-peers", MADDR], 2, "OWNER_KEY {missing}"),
    (["token", "{key}", "run", "nobody", "--initial-peers", MADDR], 2, "PEER nobody: give a peer's public key"),
    (["token", "{key}", "has space", OWNER_HEX, "--initial-peers", MADDR], 2, "RUN has space"),
    (["token", "{key}", "run", OWNER_HEX], 2, "token needs --initial-peers"),
    (["token", "{key}", "run", OWNER_HEX, "--initial-peers", MADDR, "--valid-days", "0"], 2, "--valid-days 0"),
    (["bootstrap", "--run", "has space"], 2, "--run: bad run name"),
    (["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/{taken}"], 1, "is taken"),
    (["bootstrap", "--identity", "{garbage_key}"], 2, "unrecognised key file"),
    (["keygen", "{missing_dir}/owner.key"], 2, "the folder"),
    (["keygen", "{dir}"], 2, "is a directory"),
    (["keygen", "{key}"], 2, "exists (use --force to overwrite)"),
    # demo and monitor
    (["demo", "--peers", "0"], 2, "--peers 0: must be >= 1"),
    (["demo", "--inner-steps", "0"], 2, "--inner-steps 0: must be >= 1"),
    (["demo", "--run-id", "has space"], 2, "--run-id has space: must be 1-64 letters"),
    (["demo", "--config", "{bad_codec}"], 2, "codec.name"),
    (["demo", "--workdir", "{a_file}"], 2, "--workdir {a_file}: exists and is not a directory"),
    (["monitor"], 2, "monitor needs --node PORT, --initial-peers MADDR or --replay FILE"),
    (["monitor", "--node", "http://127.0.0.1:x/status"], 2, "--node http://127.0.0.1:x/status: give a port"),
    (["monitor", "--replay", "{missing}"], 2, "--replay {missing}: no such file"),
    (["monitor", "--replay", "{bad_json}"], 2, "not a JSON or JSON-lines recording"),
    (["monitor", "--initial-peers", MADDR, "--run", "has space"], 2, "--run has space: bad run name"),
    (["monitor", "--initial-peers", "/ip4/127.0.0.1/tcp/1"], 2, "must end with the peer's id"),
]


def _fill(text: str, files: dict[str, str]) -> str:
    for name, value in files.items():
        text = text.replace("{" + name + "}", value)
    return text


@pytest.fixture
def signals_kept():
    """A command under test may install its stop handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("argv,code,fragment", CASES, ids=[" ".join(c[0])[:60] or "(none)" for c in CASES])
def test_a_bad_input_is_one_line_and_its_exit_code_before_anything_starts(
        argv, code, fragment, files, capsys, monkeypatch, signals_kept) -> None:
    monkeypatch.setenv("SWARMLOCO_FAULT", "no_dht:1")
    argv = [_fill(a, files) for a in argv]
    try:
        got = cli.main(argv)
    except SystemExit as e:  # argparse
        got = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1, err
    assert _fill(fragment, files) in lines[0], lines[0]
    assert "Traceback" not in err and "no_dht" not in err


@pytest.mark.parametrize("argv,code", [
    (["run", "{bad_codec}"], 2),                         # was: exit 1, after the DHT had started
    (["run", "{binary_data}"], 2),                       # was: trained on the bytes of a binary file
    (["run", "{good}", "--inner-steps", "0"], 2),        # was: ignored
    (["run", "{good}", "--status-port", "{taken}"], 1),  # was: a traceback, then 100% CPU
    (["run", "{good}", "--device", "cuda:3"], 2),        # was: a traceback
])
def test_a_real_process_refuses_bad_input_in_one_line(argv, code, files) -> None:
    argv = [_fill(a, files) for a in argv]
    done = subprocess.run([sys.executable, "-m", "swarmloco", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SWARMLOCO_FAULT": "no_dht:1"})
    assert done.returncode == code, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "no_dht" not in done.stderr and "listening on" not in done.stderr


def test_an_unexpected_error_is_one_line_and_v_shows_the_traceback(files, capsys, monkeypatch) -> None:
    def boom(args):
        raise KeyError("surprise")

    for verbose, traceback_shown in (([], False), (["-v"], True)):
        parser = cli.build_parser
        monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "keygen", boom))
        assert cli.main([*verbose, "keygen", files["missing"]]) == 1
        err = capsys.readouterr().err
        assert "unexpected error: KeyError" in err.strip().splitlines()[-1]
        assert ("Traceback" in err) == traceback_shown
        monkeypatch.setattr(cli, "build_parser", parser)


def _with_func(parser, command: str, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


def test_every_help_has_an_example_the_exit_codes_and_what_is_required(capsys) -> None:
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in [("swarmloco", parser), *commands.items()]:
        text = sub.format_help()
        assert "example" in text and "exit codes:" in text and "3  refused by the swarm" in text, name
        if sub is not parser:
            assert "required:" in text, name
    assert "required: CONFIG and --identity OWNER_KEY" in commands["init-run"].format_help()
