"""``python -m loadtests.bench`` = ``sparkserve bench``."""

from loadtests.bench.cli import main

main()
