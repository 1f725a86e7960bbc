#!/usr/bin/env python3
"""make preflight: machine, data scan and batch plan; writes preflight.json and preflight.md."""

from vqa.cli import main
from vqa.preflight import run_preflight

if __name__ == "__main__":
    main("preflight", run_preflight)
