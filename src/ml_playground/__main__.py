"""``python -m ml_playground``: the same as the ``ml-playground`` command."""

from ml_playground.cli import run

run()
