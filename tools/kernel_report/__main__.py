"""``python -m tools.kernel_report``: the kernel report (see report.py)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # counting needs the interpreter, chosen when triton is first imported

from tools.kernel_report.report import main

main()
