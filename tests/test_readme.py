"""The README's Python snippets run as files, as a reader would save and run them. The README's links
into the repository point at files that exist, and none points outside it.

Every fenced Python block is one of two kinds, named by its info string:

* ```` ```python ````: run here, each saved as a file and run by a fresh interpreter in a temporary
  working directory (``python snippet.py``), without the test suite's environment variables
  (``TRITON_INTERPRET``, ``AUTOSELECT_FAST_VALIDATE``) that a reader would not have set;
* ```` ```python vllm ````: needs vLLM's own environment. Here each must compile and keep its work under
  ``if __name__ == "__main__":`` (vLLM's engine process imports the file again). It is run as a file,
  in vLLM's default mode, by ``tests/test_vllm_plugin.py::test_readme_offline_script_runs_as_a_file``
  in the environment ``.ci/vllm_env.sh`` builds.

No other kind exists: a snippet that is not run somewhere fails ``test_every_python_snippet_is_run``.
"""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
KINDS = ("", "vllm")  # the info strings after ```python
SUITE_ONLY_VARIABLES = ("TRITON_INTERPRET", "AUTOSELECT_FAST_VALIDATE")  # set by tests/conftest.py, not by a reader


def python_blocks(path: str = README) -> list[tuple[str, str]]:
    """``(kind, code)`` of every fenced Python block, in order."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return [(kind.strip(), code) for kind, code in re.findall(r"^```python([^\n]*)\n(.*?)^```", text, flags=re.S | re.M)]


BLOCKS = python_blocks()
PLAIN = [code for kind, code in BLOCKS if kind == ""]
VLLM = [code for kind, code in BLOCKS if kind == "vllm"]


def test_every_python_snippet_is_run():
    assert [kind for kind, _ in BLOCKS if kind not in KINDS] == []
    assert len(PLAIN) >= 2 and len(VLLM) >= 1


@pytest.mark.parametrize("index", range(len(PLAIN)), ids=[f"block{i}" for i in range(len(PLAIN))])
def test_readme_snippet_runs_as_a_file(index, tmp_path):
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(PLAIN[index])
    env = {k: v for k, v in os.environ.items() if k not in SUITE_ONLY_VARIABLES}
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README block {index} failed as a file:\n{done.stderr[-4000:]}"


def _is_main_guard(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and isinstance(test.ops[0], ast.Eq) and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


@pytest.mark.parametrize("index", range(len(VLLM)), ids=[f"vllm-block{i}" for i in range(len(VLLM))])
def test_vllm_snippet_compiles_and_works_under_a_main_guard(index):
    """Outside the guard only imports and definitions: vLLM's engine process imports the file again, and
    anything else would run there a second time (an ``LLM(...)`` would start another engine)."""
    tree = ast.parse(VLLM[index])
    compile(tree, f"<README vllm block {index}>", "exec")
    outside = [type(node).__name__ for node in tree.body
               if not isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)) and not _is_main_guard(node)]
    assert outside == [], f"README vllm block {index} has statements outside `if __name__ == \"__main__\":`"
    assert sum(_is_main_guard(node) for node in tree.body) == 1


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
