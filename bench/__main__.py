"""``python -m bench``: run the benchmark suites on the default device and write bench/results/<device>.json."""

from __future__ import annotations

import argparse

import torch

from . import primitives
from .common import print_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes only (N = 1e6), fewer repeats")
    parser.add_argument("--K", type=int, nargs="+", default=[2, 3, 10, 40])
    parser.add_argument("--N", type=float, nargs="+", help="override the column counts (default 1e6 1e7; +1e8 on GPU)")
    parser.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.N:
        Ns = [int(n) for n in args.N]
    elif args.quick:
        Ns = [10**6]
    else:
        Ns = [10**6, 10**7] + ([10**8] if device.type == "cuda" else [])
    repeat = 3 if args.quick else args.repeat
    dtypes = [getattr(torch, d) for d in args.dtype]

    ceilings = primitives.ceilings(device)
    print(
        f"device {device} ({torch.get_num_threads()} CPU threads): copy {ceilings.copy_bandwidth / 1e9:.1f} GB/s, "
        f"read {ceilings.read_bandwidth / 1e9:.1f} GB/s"
    )
    rows = [r.finish(ceilings) for r in primitives.run(device, args.K, Ns, dtypes, repeat)]
    print_table(rows)
    config = {"K": args.K, "N": Ns, "dtypes": args.dtype, "repeat": repeat, "threads": torch.get_num_threads()}
    path = write_results(primitives.SUITE, device, ceilings, rows, config)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
