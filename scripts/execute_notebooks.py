"""Execute lede's notebooks in place (at their own settings) and keep their outputs, cleared of
machine paths, so that the saved notebooks show real results.

    .venv/bin/python scripts/execute_notebooks.py                     # both notebooks
    .venv/bin/python scripts/execute_notebooks.py notebooks/01_quickstart.ipynb

The test suite runs the same notebooks with small settings (tests/test_notebooks.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def scrub(text: str) -> str:
    """Replace machine paths in notebook output: the checkout, the home folder, temp folders."""
    text = text.replace(str(REPO) + os.sep, "").replace(str(REPO), ".")
    text = text.replace(str(Path.home()), "~")
    return re.sub(r"/tmp/[\w./-]*", "<tmp>", text)


def scrub_notebook(nb) -> None:
    """Scrub every output of ``nb`` in place (stream text, plain text/HTML results, errors) and
    drop execution timestamps."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub(out["text"])
            for mime in ("text/plain", "text/html", "text/markdown"):
                if mime in out.get("data", {}):
                    out["data"][mime] = scrub(out["data"][mime])
            if "traceback" in out:
                out["traceback"] = [scrub(t) for t in out["traceback"]]


def run(path: Path, parameters: str | None = None, timeout: int = 1800, cwd: Path = REPO):
    """Execute the notebook at ``path`` (with ``parameters``, Python source run right after its
    ``parameters`` cell, as papermill does) and return it.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (the error names the cell).
    """
    nb = nbformat.read(path, as_version=4)
    if parameters:
        idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(idx + 1, cell)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path,
                    default=sorted((REPO / "notebooks").glob("*.ipynb")))
    args = ap.parse_args()
    for path in args.notebooks:
        print(f"executing {path} ...", flush=True)
        nb = run(path)
        scrub_notebook(nb)
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)  # a half-written notebook never replaces the old one
        print(f"  saved {path}")


if __name__ == "__main__":
    main()
