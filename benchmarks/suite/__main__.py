"""``python -m benchmarks.suite``: see :mod:`benchmarks.suite.cli`."""

from benchmarks.suite.cli import main

if __name__ == "__main__":
    main()
