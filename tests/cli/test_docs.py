"""The documentation's runnable snippets run, on the sample's token folder, as a reader would paste them."""

import re

from helpers import REPO

RUNNABLE = re.compile(r"<!-- runnable: tokens/ is a token folder -->\n```python\n(.*?)```", flags=re.S)


def runnable_snippets() -> dict[str, list[str]]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return {page.name: RUNNABLE.findall(page.read_text()) for page in pages}


def test_every_runnable_snippet_of_the_docs_runs_on_a_token_folder(sample_tokens):
    snippets = runnable_snippets()
    assert len(snippets["token-files.md"]) == 2  # the DuckDB and the Polars query
    for page, codes in snippets.items():
        for code in codes:
            scope = {}
            exec(code.replace('"tokens/', f'"{sample_tokens}/').replace("'tokens/", f"'{sample_tokens}/"), scope)
            assert scope["result"] is not None, page
            assert len(scope["result"]) > 0, page
