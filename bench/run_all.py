"""Run the three benchmarks in one process and write their JSONs plus a combined Markdown summary, incrementally.

Order: ``training``, ``generation``, ``vqgan`` (each timed with its default rows), then, with ``--compile``, the
``torch.compile`` rows one at a time while the time budget allows (their compile time is reported apart:
``compile_s``), merged into the benchmark they belong to. A benchmark or row that fails (out of memory, say) is
recorded with its error and the others go on. After every step ``DIR/<benchmark>.json``, ``DIR/summary.json`` and
``DIR/summary.md`` are rewritten, so a run stopped from outside keeps what it finished.

    python -m bench.run_all                                    # CPU, tiny configurations
    python -m bench.run_all --full --json-dir out/bench        # GPU, real shapes (< 4 minutes on one H200)
    python -m bench.run_all --full --compile --budget-s 240 --json-dir out/bench
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/run_all.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as common  # noqa: E402
from bench import costs, generation, training, vqgan  # noqa: E402

# Most decisive first, in case the run is stopped from outside: the training and generation targets, then the VQGAN
# rows that explain the generation numbers.
BENCHMARKS = {"training": training, "generation": generation, "vqgan": vqgan}
COMPILE_ROWS = (
    ("generation", "product-bf16-compiled"),  # the best chance at the generation target
    ("generation", "cache-shard-bf16-compiled"),  # issue 15: the whole shard with those settings
    ("generation", "product-bf16-decoder-compiled"),
    ("vqgan", "bf16-compiled"),
    ("vqgan", "product-compiled"),
    ("generation", "product-compiled"),
    ("training", "cached-compiled"),
    # issue 15: the VQGAN under torch.compile max-autotune / CUDA graphs (minutes of autotuning on the full shapes)
    ("vqgan", "product-cudagraphs"),
    ("vqgan", "bf16-autotune"),
    ("vqgan", "product-autotune"),
    ("generation", "product-bf16-cudagraphs"),
    ("generation", "product-bf16-autotune"),
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="real shapes (meant for a GPU)")
    parser.add_argument(
        "--json-dir", type=Path, default=Path("bench/results"), help="output folder (default bench/results)"
    )
    parser.add_argument("--compile", action="store_true", help="then the torch.compile rows, within the budget")
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="skip what would start after this many seconds (default 240)"
    )
    parser.add_argument(
        "--compile-reserve-s",
        type=float,
        default=75.0,
        help="a compile row starts only with this much of the budget left (default 75)",
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    parser.add_argument("--device")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch-size", type=int, help="override every benchmark's batch size (smoke runs)")
    return parser.parse_args(argv)


def _bench_argv(args: argparse.Namespace, name: str, rows: str | None = None) -> list[str]:
    argv = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--quiet"]
    argv += ["--full"] if args.full else []
    argv += ["--device", args.device] if args.device else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    argv += ["--rows", rows] if rows else []
    return argv


def _run_one(name: str, argv: list[str]) -> dict[str, Any]:
    module = BENCHMARKS[name]
    start = time.perf_counter()
    try:
        result = module.run(module.parse_args(argv))
    except Exception as err:  # keep the other benchmarks' results
        traceback.print_exc(file=sys.stderr)
        return {"benchmark": name, "error": f"{type(err).__name__}: {str(err)[:600]}", "rows": [], "ratios": []}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _merge(name: str, base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Add ``extra``'s rows (compiled ones) to ``base`` and recompute the ratios over all rows."""
    if extra.get("error"):
        base.setdefault("errors", []).append(extra["error"])
        return base
    if base.get("error"):  # the benchmark's own rows failed as a whole: the compile rows stand alone
        extra["errors"] = [base["error"]]
        return extra
    module = BENCHMARKS[name]
    added = {r["name"] for r in extra["rows"]}
    rows = [r for r in base.get("rows", []) if r["name"] not in added] + extra["rows"]
    common.add_row_ratios(rows, module.baseline_of)
    on_gpu = extra["device_info"]["device"].startswith("cuda")
    base.update(rows=rows, ratios=module.ratios(rows, on_gpu))
    for key, value in extra.items():
        if key.startswith("agreement"):
            base.setdefault(key, {}).update(value)
    base["seconds"] = round(base.get("seconds", 0) + extra.get("seconds", 0), 1)
    return base


def _rate(results: dict[str, Any], bench: str, row: str) -> float | None:
    rows = results.get(bench, {}).get("rows", [])
    return next((r.get("images_per_s") for r in rows if r["name"] == row), None)


def _summary(results: dict[str, Any], status: dict[str, str], args: argparse.Namespace, elapsed: float) -> str:
    info = next((r["device_info"] for r in results.values() if "device_info" in r), None)
    where = f"{info['device_name']}, torch {info['torch']}" if info else "no benchmark finished"
    parts = [
        f"# DAD benchmarks — {where}, {'full' if args.full else 'tiny'} configuration",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {elapsed:.0f} s of a {args.budget_s:.0f} s budget; "
        f"{args.warmup} warm-up + {args.iters} timed calls, median.",
        "",
    ]
    parts += ["| step | status |", "|---|---|"] + [f"| {k} | {v} |" for k, v in status.items()] + [""]
    for name in BENCHMARKS:
        if name in results and results[name].get("rows"):
            parts += [common.format_result(results[name]), ""]
        elif name in results:
            parts += [f"## {name}", "", f"FAILED: {results[name].get('error')}", ""]
    if not args.full:
        return "\n".join(parts + ["(With --full, the ImageNet-1k cost table at the measured rates follows here.)"])
    students = results.get("training", {}).get("config", {}).get("students", ())
    gen_row = "cache-shard" if _rate(results, "generation", "cache-shard") else "product"
    gen_rate = _rate(results, "generation", gen_row)
    parts += ["## ImageNet-1k at these rates (perfect scaling assumed)", ""]
    for student in students or (None,):
        train_rate = _rate(results, "training", f"{student}/cached") if student else None
        parts += [
            f"generation: {gen_rate} images/s per GPU (generation row {gen_row}); training: {student} "
            f"cached, {train_rate} clean images/s per GPU",
            "",
            costs.format_scale_out(costs.scale_out(gen_rate, train_rate)),
            "",
        ]
    return "\n".join(parts)


def _write(results: dict[str, Any], status: dict[str, str], args: argparse.Namespace, start: float) -> None:
    from dad_core.io import atomic_write_json, atomic_write_text

    elapsed = time.perf_counter() - start
    for name, result in results.items():
        atomic_write_json(args.json_dir / f"{name}.json", result)
    atomic_write_json(
        args.json_dir / "summary.json",
        {"status": status, "elapsed_s": round(elapsed, 1), "budget_s": args.budget_s, "results": results},
    )
    atomic_write_text(args.json_dir / "summary.md", _summary(results, status, args, elapsed) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    args.json_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    status: dict[str, str] = {}
    only = [n for n in BENCHMARKS if n in args.only.split(",")]
    plan = [(name, None) for name in only]
    if args.compile:
        plan += [(name, row) for name, row in COMPILE_ROWS if name in only]
    for name, row in plan:
        step = f"{name}:{row}" if row else name
        left = args.budget_s - (time.perf_counter() - start)
        if left <= (args.compile_reserve_s if row else 0):
            status[step] = f"skipped: {left:.0f} s of the budget left"
            print(f"[run_all] {status[step]} for {step}", flush=True)
            _write(results, status, args, start)
            continue
        print(f"[run_all] {step} ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
        result = _run_one(name, _bench_argv(args, name, row))
        results[name] = _merge(name, results[name], result) if row and name in results else result
        failed = [r["name"] for r in result.get("rows", []) if r.get("error")]
        status[step] = (
            f"failed: {result['error']}"
            if result.get("error")
            else f"rows failed: {failed}"
            if failed
            else f"ok, {result.get('seconds')} s"
        )
        _write(results, status, args, start)
        if not result.get("error"):
            print(common.format_result(result), flush=True)
    print(f"\n[run_all] done in {time.perf_counter() - start:.0f} s; {args.json_dir / 'summary.md'}", flush=True)
    return 0 if all(s.startswith(("ok", "skipped")) for s in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
