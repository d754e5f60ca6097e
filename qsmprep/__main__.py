"""Run qsmprep as ``python -m qsmprep``."""

from qsmprep.cli.run import main

if __name__ == "__main__":
    raise SystemExit(main())
