"""`silofed-coordinator rounds list|show|export|plot|model`: read the round log, never write it.

Rule: every subcommand opens the log read-only (safe while the coordinator runs), takes
`--state-dir DIR` (the log is DIR/rounds.sqlite) or `--log FILE`, and `--json` for machines.
Human output is rich tables; every view of per-silo metrics also gives their spread across
silos (coordinator.commands.rounds_spread). Errors (no log, unreadable log, no such round,
unknown metric, a checkpoint that does not match the log) go to stderr as one sentence saying
what to do, with exit code 1. `model` writes only the file it is asked to
(coordinator/storage/model_export.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from coordinator.commands.rounds_views import (
    console_for,
    default_metric,
    export_csv,
    export_with_spread,
    final_rows,
    known_metrics,
    list_rows,
    plot_series,
    print_detail,
    print_rounds,
    with_spread,
)
from coordinator.storage.model_export import ExportError, export_model
from coordinator.storage.roundlog import LOG_FILENAME, RoundLog


class CommandError(Exception):
    """A user-facing failure; its message says what to do."""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir",
        type=Path,
        help=f"the coordinator's state directory ([federation] state_dir); reads {LOG_FILENAME}",
    )
    where.add_argument("--log", type=Path, help="path of the round log file itself")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")

    rounds = sub.add_parser(
        "rounds",
        help="inspect the round log (list, show, export, plot) and export a round's model",
        description="Inspect the round log; safe while the coordinator runs.",
    )
    verbs = rounds.add_subparsers(dest="rounds_command", required=True, metavar="ACTION")

    p = verbs.add_parser("list", parents=[common], help="one row per round")
    p.add_argument(
        "--metric",
        help="metric shown as global / worst silo / spread across silos (default: "
        "eval_accuracy, else accuracy, else the first eval_* metric, else the first metric "
        "in the log)",
    )
    p.set_defaults(func=_run(cmd_list))

    p = verbs.add_parser(
        "show",
        parents=[common],
        help="everything recorded about round N, with each eval_* metric's spread across silos",
    )
    p.add_argument("round", type=int, metavar="N", help="round number (see `rounds list`)")
    p.set_defaults(func=_run(cmd_show))

    p = verbs.add_parser(
        "export",
        parents=[common],
        help="the whole log as JSON or CSV, with each eval_* metric's spread across silos",
    )
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("-o", "--output", type=Path, help="write to FILE instead of stdout")
    p.set_defaults(func=_run(cmd_export))

    p = verbs.add_parser(
        "plot",
        parents=[common],
        help="plot the global and per-silo metric per round, with the silos' mean and their "
        "worst-best band (PNG)",
    )
    p.add_argument("--metric", required=True, help="metric name, e.g. accuracy or loss")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    p.set_defaults(func=_run(cmd_plot))

    p = verbs.add_parser(
        "model",
        parents=[common],
        help="write the global model of a completed round as safetensors, with its SHA-256",
        description="Write the checkpoint of completed round N (0: the initial model) to FILE "
        "after checking its SHA-256 against the round log, and print that digest. The "
        "checkpoints are read from the log's folder (DIR/checkpoints).",
    )
    p.add_argument(
        "--round",
        type=int,
        metavar="N",
        help="round whose model to write (0: the initial model; default: the last completed)",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="safetensors file to write (replaced)"
    )
    p.set_defaults(func=_run(cmd_model))


# -- plumbing ---------------------------------------------------------------------------------


def _run(command: Any) -> Any:
    """`command` on the opened log, printing to stdout; its errors (CommandError, RoundLogError)
    end it with coordinator.cli's EXIT_CODES."""

    def run(args: argparse.Namespace) -> int:
        with _open_log(args) as log:
            code: int = command(log, args, sys.stdout)
            return code

    return run


def _open_log(args: argparse.Namespace) -> RoundLog:
    if args.log is not None:
        path: Path = args.log
    elif args.state_dir is not None:
        if not args.state_dir.is_dir():
            raise CommandError(
                f"state directory {args.state_dir} does not exist; pass the coordinator's "
                "[federation] state_dir"
            )
        path = args.state_dir / LOG_FILENAME
    else:
        raise CommandError(
            "say which round log to read: --state-dir DIR (the coordinator's [federation] "
            "state_dir) or --log FILE"
        )
    return RoundLog.open_readonly(path)


# -- list -------------------------------------------------------------------------------------


def cmd_list(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    summaries = log.rounds()
    finals = log.final_evaluations()
    metric: str = args.metric or default_metric(summaries, finals)
    rows = list_rows(summaries, metric)
    final = final_rows(finals, metric)
    if args.json:
        doc = {"log": str(log.path), "rounds": rows, "final_evaluations": final}
        out.write(_dumps(doc) + "\n")
        return 0
    print_rounds(console_for(out), log.path, rows, final, metric)
    return 0


# -- show -------------------------------------------------------------------------------------


def cmd_show(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    detail = log.round_detail(args.round)
    if args.json:
        out.write(_dumps(with_spread(detail.to_dict())) + "\n")
        return 0
    print_detail(console_for(out), detail)
    return 0


# -- export -----------------------------------------------------------------------------------


def cmd_export(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    export = export_with_spread(log.export())
    fmt = "json" if args.json else args.format
    text = _dumps(export, indent=2) + "\n" if fmt == "json" else export_csv(export)
    if args.output is None:
        out.write(text)
        return 0
    try:
        args.output.write_text(text)
    except OSError as exc:
        raise CommandError(f"cannot write {args.output}: {exc}; choose a writable path") from exc
    print(f"wrote {len(export['rounds'])} rounds as {fmt} to {args.output}", file=sys.stderr)
    return 0


# -- model ------------------------------------------------------------------------------------


def cmd_model(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    checkpoints = log.path.parent / "checkpoints"  # <state_dir>/checkpoints, beside the log
    try:
        done = export_model(log, checkpoints, args.round, args.output)
    except ExportError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        doc = {
            "round": done.round_id,
            "output": str(done.output),
            "sha256": done.sha256,
            "bytes": done.size,
            "checkpoint": str(done.checkpoint),
        }
        out.write(_dumps(doc) + "\n")
        return 0
    what = "the initial model" if done.round_id == 0 else f"the model of round {done.round_id}"
    print(
        f"wrote {what} ({done.size:,} bytes, SHA-256 checked against the round log) to "
        f"{done.output}",
        file=sys.stderr,
    )
    out.write(f"{done.sha256}  {done.output}\n")  # `sha256sum -c` reads this line
    return 0


# -- plot -------------------------------------------------------------------------------------


def cmd_plot(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    metric: str = args.metric
    data = plot_series(log, metric)
    series, dropouts, not_completed = data.series, data.dropouts, data.not_completed
    if not series:
        known = known_metrics(log)
        hint = f"metrics in this log: {', '.join(known)}" if known else "the log has no metrics"
        raise CommandError(f"no round recorded metric {metric!r}; {hint}")
    if args.output.suffix.lower() != ".png":
        raise CommandError(f"output {args.output} must end in .png")
    import matplotlib

    matplotlib.use("Agg")  # headless: the CLI may run on a server without a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        if data.spreads:
            # Behind the lines: how far apart the silos are, round by round (fairness); in a
            # colour outside the per-silo lines' cycle, and not the grey of failed rounds.
            rounds_x = [r for r, _ in data.spreads]
            ax.fill_between(
                rounds_x, [x.worst for _, x in data.spreads], [x.best for _, x in data.spreads],
                color="goldenrod", alpha=0.2, zorder=1, label="silos: worst to best",
            )  # fmt: skip
            ax.plot(
                rounds_x, [x.mean for _, x in data.spreads], "--", color="darkgoldenrod",
                linewidth=1.5, zorder=2, label="silos: mean",
            )  # fmt: skip
        for name, points in series.items():
            xs, ys = zip(*points, strict=True)
            if name == "global":
                ax.plot(xs, ys, "k-o", linewidth=2.5, label="global", zorder=3)
            else:
                ax.plot(xs, ys, "-", marker=".", alpha=0.8, label=name)
        for i, (round_id, silo, phase) in enumerate(dropouts):
            by_round = dict(series.get(silo, []) or series.get("global", []))
            y = by_round.get(round_id, min(v for pts in series.values() for _, v in pts))
            ax.scatter(
                [round_id], [y], marker="x", s=80, color="red", zorder=4,
                label="dropout" if i == 0 else None,
            )  # fmt: skip
            who = silo.rsplit("/", 1)[-1]
            ax.annotate(
                f"{who} ({phase})", (round_id, y), textcoords="offset points", xytext=(4, 4),
                fontsize=7,
            )  # fmt: skip
        for round_id in not_completed:
            ax.axvspan(round_id - 0.4, round_id + 0.4, color="0.85", zorder=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per round (grey: round not completed)")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        try:
            fig.savefig(args.output, format="png", dpi=100)
        except OSError as exc:
            raise CommandError(
                f"cannot write {args.output}: {exc}; choose a writable path"
            ) from exc
    finally:
        plt.close(fig)
    summary = {
        "output": str(args.output),
        "metric": metric,
        "series": {k: len(v) for k, v in series.items()},
        "dropouts": [{"round": r, "silo_id": s, "phase": p} for r, s, p in dropouts],
        "not_completed": not_completed,
        "spread": [{"round": r, **x.to_dict()} for r, x in data.spreads],
    }
    if args.json:
        out.write(_dumps(summary) + "\n")
    else:
        silos = len(series) - ("global" in series)
        out.write(
            f"wrote {args.output}: {metric} of {silos} silos"
            f"{' and the global model' if 'global' in series else ''}"
            f"{', their mean and worst-best band' if data.spreads else ''}, "
            f"{len(dropouts)} dropouts marked\n"
        )
    return 0


def _dumps(value: object, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, sort_keys=False, allow_nan=False)
