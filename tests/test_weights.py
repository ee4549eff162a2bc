"""Weight files: the same tensors and metadata are the same bytes, whichever process writes them."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

WRITE = """
import sys, torch
from ppd_core.weights import save_safetensors
tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(3, dtype=torch.bfloat16)}
meta = {"format": "pt", "ppd.config": '{"x": 1}', "ppd.step": "12", "ppd.adapter": "{}", "z": "last"}
save_safetensors(tensors, sys.argv[1], meta)
"""


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors alone orders the metadata by a per-process hash seed (5 keys: 1 chance in 120 of two
    processes agreeing); written through save_safetensors, four processes write one file, which loads as usual."""
    paths = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 1
    tensors = load_file(str(paths[0]))
    assert torch.equal(tensors["b.weight"], torch.arange(6.0).reshape(2, 3))
    assert tensors["a.bias"].dtype == torch.bfloat16
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {
            "format": "pt",
            "ppd.config": '{"x": 1}',
            "ppd.step": "12",
            "ppd.adapter": "{}",
            "z": "last",
        }
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left
