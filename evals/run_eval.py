"""``python evals/run_eval.py ...`` behaves exactly like ``hidream-mlx eval ...``."""

import sys

from hidream_mlx.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]], prog_name="hidream-mlx")
