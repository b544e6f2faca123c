"""``python -m detr_deform.launch``: the documented command for :mod:`detr_deform.cli.launch`
(torchrun, same arguments, with the shell's exit status when the job is stopped)."""
import sys

from detr_deform.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
