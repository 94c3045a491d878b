"""Run by tests/test_puzzle_bld.py, alone or under torchrun: build a tiny library in argv[1] and run BLD on it."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import random_model, tiny_arch  # noqa: E402
from tessera.puzzle.bld import BLDConfig, run_bld  # noqa: E402
from tessera.puzzle.library import Library, LibraryConfig, build_library  # noqa: E402

if __name__ == "__main__":
    import os

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    parent = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64))
    chunks = torch.randint(0, 96, (40, 16), generator=torch.Generator().manual_seed(0))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        build_library(parent, LibraryConfig(ffn_fractions=(0.5, 0.25), ffn_multiple=8), chunks[:16], out,
                      parent_source="tiny")
    else:
        import time

        while not (out / "library.json").is_file():  # rank 0 builds the library; the others wait for it
            time.sleep(0.05)
    run_bld(Library.load(out), parent, chunks, BLDConfig(tokens=10**6, batch=4, lr=1e-3, warmup_steps=5),
            progress=False)
