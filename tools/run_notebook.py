"""Executes benchmarks/attention_benchmark.ipynb in place of a person (no Jupyter needed
beyond nbclient, nbformat and ipykernel), and writes the executed copy to the given path
even when a cell fails, so the outputs up to the failure are kept.

    python tools/run_notebook.py [OUTPUT.ipynb]   (default: the notebook itself)
"""

import pathlib
import sys
import time

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "attention_benchmark.ipynb"


def main():
  output = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=None,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  start = time.time()
  try:
    client.execute()
    print(f"executed in {time.time() - start:.0f} s")
  finally:
    nbformat.write(notebook, output)
    print(f"wrote {output}")


if __name__ == "__main__":
  main()
