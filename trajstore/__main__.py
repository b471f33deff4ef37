"""`python -m trajstore`: the same command line as the `trajstore` script (also what torchrun launches)."""

from trajstore.cli.main import main

if __name__ == "__main__":
    main()
