"""``python -m fusionlm`` is the ``fusionlm`` command."""

from fusionlm.cli import run

run()
