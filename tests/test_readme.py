"""The README's Python snippets run as written: each fenced ```python block is executed on its own, in a
fresh namespace and a temporary working directory, exactly as a reader would paste it. The README's
links into the repository point at files that exist, and none points outside it.
"""
import os
import re
import runpy

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks(README)


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs_as_written(index, tmp_path, monkeypatch):
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(BLOCKS[index])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")


def test_readme_links_stay_inside_the_repository():
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    targets = re.findall(r"\]\(([^)#\s]+)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "expected links to the project's docs"
    for target in local:
        path = os.path.normpath(os.path.join(ROOT, target))
        assert path.startswith(ROOT + os.sep), f"README links outside the repository: {target}"
        assert os.path.exists(path), f"README links to a missing file: {target}"
