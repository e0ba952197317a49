"""`python -m lorafit`: the same entry point as the `lorafit` console script."""

from lorafit.cli.main import main

main()
