"""Code that builds and studies herd-tiny; not part of the installed package (see scripts/train-herd-tiny)."""
