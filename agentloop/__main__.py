"""``python -m agentloop`` is the ``agentloop`` command (for environments without the console script)."""

from .cli import main

main()
