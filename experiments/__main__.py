"""``python -m experiments ...`` is the ``eos`` command line."""

from experiments.cli import main

if __name__ == "__main__":
    main()
