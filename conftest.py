"""pytest configuration shared by the unit tests and nbval.

nbval compares every output stream of a notebook cell, stderr included. Warnings
and tqdm progress bars go to stderr and vary from run to run, so stderr is not
compared; stdout, results and displayed text are.
"""
import os
import sys

# The tests must never wait for the Hugging Face hub (it is unreachable here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        notebook = item.parent
        skip = getattr(notebook, "skip_compare", None)
        if skip is not None and "stderr" not in skip:
            notebook.skip_compare = tuple(skip) + ("stderr",)
