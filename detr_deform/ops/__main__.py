"""Command line for the compiled operator.

    python -m detr_deform.ops build [--cuda | --cpu | --emulation] [--verbose]
    python -m detr_deform.ops info

--emulation builds the CPU emulation of the CUDA kernels that the tests use
(normal C++ compiler, no nvcc), instead of the operator.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detr_deform.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the operator now (otherwise it compiles on first use)")
    flavour = build.add_mutually_exclusive_group()
    flavour.add_argument("--cuda", action="store_true", help="also compile the CUDA kernels (needs nvcc)")
    flavour.add_argument("--cpu", action="store_true", help="CPU kernels only")
    flavour.add_argument("--emulation", action="store_true",
                         help="the CPU emulation of the CUDA kernels (test harness) instead of the operator")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    sub.add_parser("info", help="print where the sources and builds are, and which builds exist and work")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help and usage errors answer before torch loads

    from detr_deform.ops import _build

    if args.command == "info":
        print(f"sources:        {_build.source_dir()}")
        print(f"torch:          {torch.__version__} (CUDA {torch.version.cuda}, "
              f"GPU visible: {torch.cuda.is_available()})")
        print(f"CUDA requested: {_build.cuda_requested()}")
        print(f"build dir:      {_build.build_dir(_build.cuda_requested())}")
        print(f"emulation dir:  {_build.build_dir(False, flavour='cuda-emulation')}")
        from detr_deform.ops.status import build_statuses, format_statuses  # loads the builds: only for info

        print("builds (cached libraries; the one this machine uses is loaded and run once):")
        print(format_statuses(build_statuses()))
        return 0

    with_cuda = True if args.cuda else False if args.cpu else None
    try:
        if args.emulation:
            library = _build.build_and_load_emulation(verbose=args.verbose)
        else:
            library = _build.build_and_load(with_cuda=with_cuda, verbose=args.verbose)
    except _build.OpsBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built and loaded {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
