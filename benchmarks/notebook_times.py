"""How long the notebooks take to run, measured two ways.

Usage:  python benchmarks/notebook_times.py [NOTEBOOK ...] [--repeats 3] [--cold]

* "kernel + cells": start a fresh kernel and run every cell, as JupyterLab's "Restart Kernel and
  Run All Cells" does (nbclient, the library behind nbconvert and nbval, in this process).
* "nbconvert": `python -m nbconvert --to notebook --execute` from the shell, which also pays for
  starting nbconvert itself and writing the executed notebook.

Without NOTEBOOK it times the four LLM notebooks. Warm (the default) uses the lab's trained models
in artifacts/ (an untimed first run trains them if they are missing). --cold runs every repeat in a
fresh temporary copy of the project with no artifacts/, so each run trains the lab first.

For each notebook it prints every run, and splits the median "kernel + cells" run into kernel
start-up, the import cell, and the slowest other cells. The spread between runs is the machine's
noise. It prints figures; it asserts nothing.
"""
import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
LLM_NOTEBOOKS = ["intuition_model.ipynb", "llm_ppo.ipynb", "llm_ppo_correct_dropout.ipynb", "llm_grpo.ipynb"]


def run_kernel_and_cells(notebook, workdir):
    """Fresh kernel, every cell, kernel shut down; returns (wall seconds, executed notebook)."""
    executed = nbformat.read(workdir / notebook, as_version=4)
    client = NotebookClient(executed, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute(stderr=subprocess.DEVNULL)  # the kernel's own start-up notices, not the notebook's output
    return time.perf_counter() - start, executed


def run_nbconvert(notebook, workdir, output_dir):
    """`python -m nbconvert --execute` in a subprocess; returns wall seconds."""
    command = [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", notebook,
               "--output-dir", str(output_dir), "--output", "timed"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{notebook} failed to run:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def cell_seconds(executed):
    """(first code line, seconds, source) per code cell, from the timing nbclient stores in the metadata."""
    def parse(stamp):
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    cells = []
    for cell in executed.cells:
        timing = cell.metadata.get("execution", {})
        if cell.cell_type != "code" or "iopub.execute_input" not in timing:
            continue
        lines = [line for line in cell.source.splitlines() if line.strip() and not line.startswith(("#", "%"))]
        seconds = (parse(timing["shell.execute_reply"]) - parse(timing["iopub.execute_input"])).total_seconds()
        cells.append((lines[0] if lines else "", seconds, cell.source))
    return cells


def spread(walls):
    if len(walls) == 1:
        return f"{walls[0]:.1f} s"
    return (f"median {statistics.median(walls):.1f} s, fastest {min(walls):.1f} s, slowest {max(walls):.1f} s"
            f"   (runs: {', '.join(f'{wall:.1f}' for wall in walls)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", default=LLM_NOTEBOOKS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="train the lab in every run (empty cache)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    for notebook in args.notebooks:
        if not (ROOT / notebook).is_file():
            parser.error(f"no notebook {notebook!r} in {ROOT}")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)

        def workdir_for_run():
            if not args.cold:
                return ROOT
            workdir = Path(tempfile.mkdtemp(dir=scratch))  # what the notebooks need, without artifacts/
            for name in ["utils.py", "llm_lab.py", "rlhf.py", *LLM_NOTEBOOKS, *args.notebooks]:
                shutil.copy(ROOT / name, workdir / name)
            return workdir

        if not args.cold and set(args.notebooks) & set(LLM_NOTEBOOKS) and not (ROOT / "artifacts").is_dir():
            print("training the lab first (untimed run of intuition_model.ipynb) ...", flush=True)
            run_kernel_and_cells("intuition_model.ipynb", ROOT)
        for notebook in args.notebooks:
            kernel_runs = [run_kernel_and_cells(notebook, workdir_for_run()) for _ in range(args.repeats)]
            cli_walls = [run_nbconvert(notebook, workdir_for_run(), scratch) for _ in range(args.repeats)]
            kernel_walls = [wall for wall, _ in kernel_runs]
            median_wall, median_nb = sorted(kernel_runs, key=lambda run: run[0])[len(kernel_runs) // 2]
            cells = cell_seconds(median_nb)
            first_cell_seconds = cells[0][1]  # by the course's convention, the imports
            other_seconds = sum(seconds for _, seconds, _ in cells[1:])
            runs = f"{args.repeats} run{'s' if args.repeats > 1 else ''} each"
            print(f"\n{notebook} ({'empty cache' if args.cold else 'warm cache'}, {runs})")
            print(f"  kernel + cells: {spread(kernel_walls)}")
            print(f"  nbconvert     : {spread(cli_walls)}")
            print(f"  median kernel + cells run, {median_wall:.1f} s: "
                  f"{median_wall - first_cell_seconds - other_seconds:.1f} s kernel start and shut-down, "
                  f"{first_cell_seconds:.1f} s the first code cell (imports), "
                  f"{other_seconds:.1f} s the other {len(cells) - 1} cells;"
                  f" slowest:")
            for line, seconds, _ in sorted(cells[1:], key=lambda cell: -cell[1])[:4]:
                print(f"    {seconds:5.2f} s  {line[:90]}")


if __name__ == "__main__":
    main()
