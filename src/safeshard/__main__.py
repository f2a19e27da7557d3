"""``python -m safeshard``."""

from safeshard.cli import main

main(prog_name="safeshard")
