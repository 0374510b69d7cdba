"""The command lines. `main`, `sweep_main` and `demo_main` are the console entry points."""

from .demo import demo_main
from .main import main, sweep_main

__all__ = ["demo_main", "main", "sweep_main"]
