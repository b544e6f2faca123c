"""Launched by torchrun (2 processes, gloo): both ranks call distributed.rank_zero_first with a
function that records when it starts and ends (appending to one file); rank 0 sleeps inside it,
so rank 1 starting early would show up as an interleaving."""
import sys
import time

import torch.distributed as dist

from detr_deform.utils import distributed


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def fetch() -> int:
        with open(out_path, "a") as handle:
            handle.write(f"{rank}-start\n")
        if rank == 0:
            time.sleep(1.0)  # a download
        with open(out_path, "a") as handle:
            handle.write(f"{rank}-end\n")
        return rank

    assert distributed.rank_zero_first(fetch) == rank
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
