"""Multi-task learning on real digits: every method of flatmtl_fast on a Multi-MNIST-style task, offline, on the CPU.

The UCI handwritten digits bundled with scikit-learn (1,797 8 × 8 images) are composed into two-digit
images (tasks: left digit, right digit, their sum); a small shared CNN is trained with each method and
its per-task test accuracy and the time it spent in the model vs in aggregation are printed, then
written to <out>/digits_<setting>_<seeds>seed.json, .md (table) and .png (plot).

    python examples/digits                                   # all 13 methods, 1 seed (a few minutes on a CPU)
    python examples/digits --seeds 3                         # mean ± std over seeds 0, 1, 2
    python examples/digits --methods EW UPGrad UPGrad+F-MTL --noisy 0.4     # 40 % of the left labels flipped
    python examples/digits --low-resource 0.1                # 10 % of the training digits
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from data import N_TEST, N_TRAIN, TASK_NAMES, make_datasets
from report import write
from tqdm import tqdm
from train import METHODS, TrainConfig, run, steps_for

import flatmtl_fast

HERE = Path(__file__).resolve().parent
DATA_SEED = 0  # the composed data are the same for every training seed: the spread over seeds is the training's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python examples/digits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        metavar="METHOD",
        help=f"methods to train (default: all): {', '.join(METHODS)}",
    )
    parser.add_argument("--seeds", type=int, default=1, help="train with seeds 0 .. SEEDS-1 (default 1)")
    parser.add_argument("--epochs", type=float, default=5, help="passes over the full-size training set (default 5)")
    parser.add_argument(
        "--noisy",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of one task's training labels flipped to another class (default 0)",
    )
    parser.add_argument("--noisy-task", choices=TASK_NAMES, default="left", help="the task with noisy labels")
    parser.add_argument(
        "--low-resource",
        type=float,
        default=1.0,
        metavar="FRACTION",
        help="fraction of the training digits kept, at the same number of steps (default 1)",
    )
    parser.add_argument("--tasks", type=int, choices=(2, 3), default=3, help="2: left, right; 3: also their sum")
    parser.add_argument("--n-train", type=int, default=N_TRAIN, help="composed training images (default %(default)s)")
    parser.add_argument("--n-test", type=int, default=N_TEST, help="composed test images (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="default %(default)s")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam's learning rate (default %(default)s)")
    parser.add_argument("--rho", type=float, default=TrainConfig.rho, help="F-MTL's radius (default %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: this small network gains nothing from more)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.epochs <= 0:
        parser.error("--seeds and --epochs must be positive")
    if TASK_NAMES.index(args.noisy_task) >= args.tasks:
        parser.error(f"--noisy-task {args.noisy_task} needs --tasks 3")
    return args


def setting_name(noisy: float, noisy_task: str, low_resource: float) -> str:
    """A file-name tag of the data setting in percent, e.g. ``clean``, ``noisy40-left``, ``low10``."""
    parts = []
    if noisy > 0:
        parts.append(f"noisy{100 * noisy:g}-{noisy_task}")
    if low_resource < 1:
        parts.append(f"low{100 * low_resource:g}")
    return "_".join(parts) or "clean"


def environment(device: str) -> dict[str, str | int]:
    """Where the times were measured (they depend on the machine and on its load)."""
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")  # Linux names the CPU model here; platform.processor() is often empty there
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        hardware = models[0] if models else platform.processor() or "cpu"
    return {
        "device": hardware,
        "cpu_count": os.cpu_count() or 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flatmtl_fast": flatmtl_fast.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    """Compose the data, train every (method, seed), print and write the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = list(TASK_NAMES[: args.tasks])
    train, test = make_datasets(
        n_train=args.n_train,
        n_test=args.n_test,
        tasks=args.tasks,
        noisy=args.noisy,
        noisy_task=tasks.index(args.noisy_task),
        low_resource=args.low_resource,
        seed=DATA_SEED,
    )
    config = TrainConfig(
        steps=steps_for(args.epochs, args.n_train, args.batch_size),
        batch_size=args.batch_size,
        lr=args.lr,
        rho=args.rho,
        device=args.device,
    )
    setting = setting_name(args.noisy, args.noisy_task, args.low_resource)
    print(
        f"digits [{setting}]: {len(train)} training / {len(test)} test images of {tuple(train.images.shape[2:])}, "
        f"tasks {', '.join(tasks)}; {config.steps} steps of {config.batch_size} on {args.device}",
        flush=True,
    )
    runs = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        for method in args.methods:
            result = run(method, train, test, seed, config, progress=not args.no_progress)
            runs.append(result)
            accuracies = "  ".join(f"{task} {100 * acc:5.1f}%" for task, acc in result["accuracy"].items())
            times = result["time"]
            tqdm.write(
                f"{method:<15} seed {seed}  {accuracies}  mean {100 * result['mean_accuracy']:5.1f}%  "
                f"model {times['model_s']:5.1f} s  aggregation {times['aggregation_s']:5.1f} s  "
                f"optimizer {times['optimizer_s']:4.1f} s",
                file=sys.stdout,
            )
    settings = {
        **{key: value for key, value in vars(args).items() if key not in ("out", "no_progress")},
        "data_seed": DATA_SEED,
        "steps": config.steps,
        "n_train_used": len(train),
        "environment": environment(args.device),
    }
    seeds = "1 seed" if args.seeds == 1 else f"mean ± std over {args.seeds} seeds"
    title = f"UCI digits, two-digit composition [{setting}]: test accuracy, {seeds}"
    paths = write(runs, settings, tasks, args.out, f"digits_{setting}_{args.seeds}seed", title)  # no overwrites
    print(f"\n{len(runs)} runs in {time.perf_counter() - started:.0f} s\n")
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
