"""README and pyproject describe only what exists: a feature's name appears once its module does."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# claim (regular expression, case-insensitive) -> the module that must exist before anything may claim it
CLAIMS = {
    r"puzzle": "tessera.puzzle.mip",  # Puzzle search: the MIP is what makes it a search
    r"quantiz": "tessera.quantize",
    r"vllm": "tessera.formats.configuration_decilm",  # vLLM loads children once they carry the config shim
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("claim, module", CLAIMS.items())
def test_readme_and_pyproject_claim_only_what_exists(claim, module):
    texts = {"README.md": (ROOT / "README.md").read_text(),
             "pyproject.toml description": re.search(r'^description = "(.*)"$', (ROOT / "pyproject.toml").read_text(),
                                                     re.MULTILINE).group(1)}
    for where, text in texts.items():
        if re.search(claim, text, re.IGNORECASE):
            assert _exists(module), f"{where} mentions {claim!r} but {module} does not exist: describe what works"
