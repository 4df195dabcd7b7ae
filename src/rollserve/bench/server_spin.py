"""One HTTP server with libgomp's default spin against the same server with a short one.

    python -m rollserve.bench.server_spin --preset qwen2.5-0.5b --num-prompts 128 \\
        --concurrency 64 --repeats 2

The engine keeps one OpenMP team, whose idle workers spin GOMP_SPINCOUNT rounds before they
sleep: by default 300000 (~5 ms here), which keeps a core busy after every step. The short
spin (`--short-spin`, the test suite's setting) lets engines share cores; this measures what
it costs a server that has its cores to itself. Each round runs both, in alternating order,
on bench.online's workload and clients.
"""

from __future__ import annotations

from rollserve.bench.offline import RunResult, print_table
from rollserve.bench.online import online_workload, run_online, workload_parser

DEFAULT_SPIN = 300000  # libgomp's own default


def main(argv: list[str] | None = None) -> None:
    parser = workload_parser("python -m rollserve.bench.server_spin", __doc__.split("\n\n")[0])
    parser.add_argument("--short-spin", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    model, workload = online_workload(args)
    spins = [DEFAULT_SPIN, args.short_spin]
    runs: dict[int, list[RunResult]] = {spin: [] for spin in spins}
    for round_index in range(args.repeats):
        for spin in spins[:: -1 if round_index % 2 else 1]:
            runs[spin].append(run_online(model, workload, args.concurrency, args, args.port,
                                         {"GOMP_SPINCOUNT": str(spin)}, f"GOMP_SPINCOUNT={spin}"))
    print("seconds per round:", {spin: [round(r.seconds, 1) for r in runs[spin]]
                                 for spin in spins})
    totals = {spin: sum(r.seconds for r in runs[spin]) for spin in spins}
    print(f"model: {model} ({args.dtype}, {args.device}); {args.num_prompts} prompts, "
          f"{args.concurrency} streams")
    print_table([min(runs[spin], key=lambda r: r.seconds) for spin in spins])
    print(f"short_vs_default_spin (total seconds): {totals[DEFAULT_SPIN] / totals[spins[1]]:.2f}")


if __name__ == "__main__":
    main()
