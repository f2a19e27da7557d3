"""``python -m safeshard``."""

from .cli import main

main(prog_name="safeshard")
