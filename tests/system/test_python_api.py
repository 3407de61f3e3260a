"""docs/python-api.md's notebook: shards, a tokenizer, tokens and a few pretrain steps from Python.

A system test because it runs every stage end to end (about a minute on 2 cores).
"""

import re

from helpers import REPO

NOTEBOOK = re.compile(r"<!-- runnable: a notebook in an empty folder -->\n```python\n(.*?)```", flags=re.S)


def test_the_python_api_page_runs_as_a_notebook_would(tmp_path, monkeypatch, capsys):
    """docs/python-api.md's walk from photographs to a pretrained model, run as it is written."""
    (code,) = NOTEBOOK.findall((REPO / "docs" / "python-api.md").read_text())
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    said = capsys.readouterr().out.splitlines()
    assert said[0] == "14 images in 2 shards" and said[2] == "28 views tokenized"
    assert said[1].startswith("tokenizer: PSNR ") and "'steps': 4" in said[3]
    assert (tmp_path / "beit-api" / "run" / "checkpoint.pt").is_file()

