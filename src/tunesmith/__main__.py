"""`python -m tunesmith`: the same as the `tunesmith` command."""

from .cli import main

if __name__ == "__main__":
    main()
