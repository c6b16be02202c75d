"""Run in fresh processes by tests/test_hf_across_processes.py: builds a tiny hf model and trains a
tokenizer from scratch (into its own empty cache), and prints their hashes as one JSON line.

usage: python hf_probe.py CONFIG.toml CACHE_DIR
"""

import hashlib
import json
import sys
from pathlib import Path

from swarmloco.config import load_config
from swarmloco.data import prepare_data
from swarmloco.models import build_model


def params_sha256(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    cfg = load_config(sys.argv[1])
    cache = Path(sys.argv[2])
    data = prepare_data(cfg.data, cache_dir=cache)
    print(json.dumps({
        "params": params_sha256(build_model(cfg.model, cfg.seed)),
        "tokenizer_sha256": data.tokenizer_sha256,
        "tokenizer_files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted((cache / "tokenizers").iterdir())},
    }))


if __name__ == "__main__":
    main()
