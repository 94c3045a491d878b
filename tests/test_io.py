"""tessera.io.read_json: one reader for the versioned JSON files tessera writes (library, scores, stages, manifest)."""

import pytest

from tessera.errors import TesseraError
from tessera.io import atomic_write_json, read_json


def test_read_json_checks_format_and_version_and_names_the_fix(tmp_path):
    file = tmp_path / "x.json"
    atomic_write_json(file, {"format": "tessera.thing", "version": 2, "n": 1})
    assert read_json(file, fix="redo it", format="tessera.thing", version=2)["n"] == 1
    with pytest.raises(TesseraError, match=r"x.json: not a tessera thing of version 3; redo it$"):
        read_json(file, fix="redo it", format="tessera.thing", version=3, what="a tessera thing")
    with pytest.raises(TesseraError, match="not a tessera file of version 2; redo it"):
        read_json(file, fix="redo it", format="tessera.other", version=2)
    file.write_text('{"format": "tessera.thing", "vers')
    with pytest.raises(TesseraError, match=r"x.json: not valid JSON \(.+\); redo it$"):
        read_json(file, fix="redo it")
    file.write_text("[1, 2]")  # valid JSON, not an object: another format
    with pytest.raises(TesseraError, match="not a tessera file of version 2"):
        read_json(file, fix="redo it", format="tessera.thing", version=2)
    assert read_json(file, fix="redo it") == [1, 2]  # no format asked: any JSON
