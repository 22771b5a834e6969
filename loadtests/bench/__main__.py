"""``python -m sparkserve.loadtests.bench`` = ``sparkserve bench``."""

from sparkserve.loadtests.bench.cli import main

main()
