"""``python -m sparkserve ...`` is the ``sparkserve`` command."""

from sparkserve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
