"""``python -m posequant``: the same as the ``posequant`` command."""

from posequant.cli import main

main(prog_name="posequant")
