"""`python -m bitsmith ...`: the same command line as `bitsmith ...`."""
from .cli.main import main

if __name__ == "__main__":
    main(prog_name="bitsmith")
