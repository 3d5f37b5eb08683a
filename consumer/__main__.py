"""``python -m consumer`` is ``lash-consumer``."""

from consumer.cli import main

main()
