"""A module for tests/unit/test_forked.py to start: it waits until its
pipe (argv[0]) reads end of file."""

import os


def main(argv: list[str]) -> None:
    os.read(int(argv[0]), 1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
