#!/usr/bin/env python3
"""make eval: validation accuracy per letter, confusion matrix, test accuracy when a key exists."""

from vqa.cli import main
from vqa.evaluate import evaluate

if __name__ == "__main__":
    main("eval", evaluate)
