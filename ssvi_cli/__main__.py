"""``python -m ssvi_cli``: the same command line as ``ssvi`` (and what torchrun workers run)."""

from ssvi_cli.cli import main

if __name__ == "__main__":
    main()
