"""``python -m atlas_pl`` runs the CLI."""

from atlas_pl.cli import main

main()
