"""``python -m bench``: run benchmark suites on the default device and merge them into bench/results/<device>.json.

Suites: ``primitives`` (gram, combine, row_norms and perturb vs torch; the default), ``aggregators`` (every method's
full step and solve vs the reference backend and torchjd, plus peak extra memory on the CPU) and
``solvers`` (weights(M) alone per method and K) and ``training`` (a whole step of a 4.7 M-parameter
MLP or a ViT-B-sized trunk with K heads vs torchjd's mtl_backward, and F-MTL steps vs the official code's loop)
and ``distributed`` (the MLP's training step and the aggregation alone through a process group of one rank,
both layouts, against the plain path: issue 7's world-size-1 overhead).
"""

from __future__ import annotations

import argparse

import torch

from . import aggregators, distributed, primitives, solvers, training
from .common import Ceilings, Row, print_table, write_results

METHODS = list(aggregators.TORCHJD_PEERS)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    suites = ["primitives", "aggregators", "solvers", "training", "distributed"]
    parser.add_argument("--suite", nargs="+", default=["primitives"], choices=suites)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes only (N = 1e6), fewer repeats")
    parser.add_argument("--K", type=int, nargs="+", default=[2, 3, 10, 40])
    parser.add_argument("--N", type=float, nargs="+", help="override the column counts (default 1e6 1e7; +1e8 on GPU)")
    parser.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="aggregators suite only")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--solve-K", type=int, nargs="+", default=[10, 64, 128], help="solvers suite: K values")
    parser.add_argument("--train-method", default="UPGrad", help="training suite: the aggregator")
    parser.add_argument("--train-K", type=int, nargs="+", default=[3], help="training suite: numbers of tasks")
    parser.add_argument(
        "--batch",
        type=int,
        help="training suite: batch size (default per model: mlp 64, vit-b 32 images, deep-narrow 8)",
    )
    parser.add_argument(
        "--train-model", nargs="+", default=["mlp"], choices=list(training.MODELS), help="training suite: trunks"
    )
    parser.add_argument(
        "--train-impls", nargs="+", choices=training.IMPLS, help="training suite: steps to run (default: all available)"
    )
    parser.add_argument("--train-bf16", action="store_true", help="training suite: forward passes under bf16 autocast")
    parser.add_argument("--dist-method", default="UPGrad", help="distributed suite: the aggregator")
    parser.add_argument(
        "--dist-K", type=int, nargs="+", default=[3, 10], help="distributed suite: K of the aggregation rows"
    )  # its training-step rows take --train-K and --batch
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.N:
        Ns = [int(n) for n in args.N]
    elif args.quick:
        Ns = [10**6]
    else:
        Ns = [10**6, 10**7] + ([10**8] if device.type == "cuda" else [])
    repeat = 3 if args.quick else args.repeat
    ceilings = Ceilings.measure(device, nbytes=(1 << 30) if device.type == "cuda" else (400 << 20))
    print(
        f"device {device} ({torch.get_num_threads()} CPU threads): copy {ceilings.copy_bandwidth / 1e9:.1f} GB/s, "
        f"read {ceilings.read_bandwidth / 1e9:.1f} GB/s"
    )
    config = {"K": args.K, "N": Ns, "repeat": repeat, "threads": torch.get_num_threads()}

    if "primitives" in args.suite:
        dtypes = [getattr(torch, d) for d in args.dtype]
        rows = [r.finish(ceilings) for r in primitives.run(device, args.K, Ns, dtypes, repeat)]
        print_table(rows)
        print(f"\nwrote {write_results(primitives.SUITE, device, ceilings, rows, {**config, 'dtypes': args.dtype})}")

    if "aggregators" in args.suite:
        rows: list[Row] = []
        for name in args.methods:
            for N in Ns:
                for K in args.K:
                    rows += [r.finish(ceilings) for r in aggregators.measure_method(name, device, K, N, repeat)]
            if device.type == "cpu":
                K_mem, N_mem = (10 if 10 in args.K else args.K[-1]), max(Ns)
                for impl in ("flatmtl", "reference", "torchjd"):
                    if impl == "torchjd" and aggregators.TORCHJD_PEERS[name] is None:
                        continue
                    extra = aggregators.peak_extra_memory(name, impl, K_mem, N_mem)
                    for r in rows:
                        if r.op == f"{name}:step" and r.impl == impl and (r.K, r.N) == (K_mem, N_mem):
                            r.extra["peak_extra_MB"] = extra / 1e6 if extra >= 0 else -1.0
            # after each method (rows merge by case): a run cut short by a time limit keeps what it measured
            path = write_results(aggregators.SUITE, device, ceilings, rows, {**config, "methods": args.methods})
        print_table(rows)
        print(f"\nwrote {path}")

    if "solvers" in args.suite:
        rows = []
        for K in args.solve_K:  # saved after each K: a run cut short by a time limit keeps what it measured
            rows += [r.finish(ceilings) for r in solvers.run(device, [K], max(repeat, 9))]
            path = write_results(solvers.SUITE, device, ceilings, rows, {"K": args.solve_K})
        print_table(rows)
        print(f"\nwrote {path}")

    if "training" in args.suite:
        rows, batches = [], {}
        for model in args.train_model:
            batch = batches[model] = args.batch or training.DEFAULT_BATCH[model]
            options = {"model": model, "impls": args.train_impls, "amp": args.train_bf16}
            rows += training.run(device, args.train_method, args.train_K, batch, repeat, **options)
        rows = [r.finish(ceilings) for r in rows]
        print_table(rows)
        train_config = {**config, "batch": batches, "bf16": args.train_bf16}
        path = write_results(training.SUITE, device, ceilings, rows, train_config)
        print(f"\nwrote {path}")

    if "distributed" in args.suite:
        batch = args.batch or training.DEFAULT_BATCH["mlp"]
        rows = distributed.run(device, args.dist_method, args.train_K, batch, args.dist_K, Ns, repeat)
        rows = [r.finish(ceilings) for r in rows]
        print_table(rows)
        print(distributed.summary(rows))
        dist_config = {"method": args.dist_method, "train_K": args.train_K, "batch": batch, "K": args.dist_K}
        path = write_results(distributed.SUITE, device, ceilings, rows, {**dist_config, "N": Ns, "repeat": repeat})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
