#!/usr/bin/env python3
"""One-shot generation: ``python generate_hidream_mlx.py ...`` is ``hidream-mlx generate ...``."""

import sys

from hidream_mlx.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]], prog_name="generate_hidream_mlx.py")
