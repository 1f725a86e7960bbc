#!/usr/bin/env python3
"""make submit: predicts every test row once and writes a validated submission.csv."""

from vqa.cli import main
from vqa.submit import submit

if __name__ == "__main__":
    main("submit", submit)
