"""``python -m benchmarks.step_cost``: see :mod:`benchmarks.step_cost.cli`."""

from benchmarks.step_cost.cli import main

if __name__ == "__main__":
    main()
