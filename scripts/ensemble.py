#!/usr/bin/env python3
"""make ensemble: blends RUNS' test probabilities into one validated submission.csv."""

from vqa.cli import main
from vqa.ensemble import check_runs, ensemble

if __name__ == "__main__":
    main("ensemble", ensemble, before=check_runs)
