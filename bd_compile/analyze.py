"""``python -m bd_compile.analyze``: the old name of ``python -m bd_compile.analysis``."""

from __future__ import annotations

import sys

from bd_compile.analysis.__main__ import Subject, class_conditional, load_subject, main, parser

__all__ = ["Subject", "class_conditional", "load_subject", "main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
