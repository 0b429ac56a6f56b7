"""Tests of the Python front end: run from python/ with Debian's Python
(`/usr/bin/python3 -m pytest -q`); the package comes from this tree and the library from
../build (or $EFORMER_LIB). `./run.sh test` runs them."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def eformer_bin():
    """The eformer command beside the library (for checkpoints made by `eformer train`)."""
    import eformer

    path = os.environ.get("EFORMER_BIN") or os.path.join(os.path.dirname(eformer.LIBRARY_PATH),
                                                         "eformer")
    if not os.access(path, os.X_OK):
        pytest.skip(f"the eformer command is not at {path} (set EFORMER_BIN)")
    return path
