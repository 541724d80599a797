"""`silofed-coordinator rounds list|show|export|plot|model`: read the round log, never write it.

Rule: every subcommand opens the log read-only (safe while the coordinator runs), takes
`--state-dir DIR` (the log is DIR/rounds.sqlite) or `--log FILE`, and `--json` for machines.
Human output is rich tables. Errors (no log, unreadable log, no such round, unknown metric, a
checkpoint that does not match the log) go to stderr as one sentence saying what to do, with
exit code 1. `model` writes only the file it is asked to (coordinator/storage/model_export.py).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from coordinator.storage.model_export import ExportError, export_model
from coordinator.storage.roundlog import (
    LOG_FILENAME,
    FinalEvaluation,
    RoundDetail,
    RoundLog,
    RoundLogError,
    RoundSummary,
)

# Silo agents report their evaluation of the received global model as `eval_*`; tasks name
# their metrics freely, so `rounds list` picks the first of these the log holds.
PREFERRED_METRICS = ("eval_accuracy", "accuracy")
CSV_FIELDS = ("round", "scope", "subject", "field", "value")


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
        help="metric shown as global / worst silo (default: eval_accuracy, else accuracy, "
        "else the first metric in the log)",
    )
    p.set_defaults(func=_run(cmd_list))

    p = verbs.add_parser("show", parents=[common], help="everything recorded about round N")
    p.add_argument("round", type=int, metavar="N", help="round number (see `rounds list`)")
    p.set_defaults(func=_run(cmd_show))

    p = verbs.add_parser("export", parents=[common], help="the whole log as JSON or CSV")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("-o", "--output", type=Path, help="write to FILE instead of stdout")
    p.set_defaults(func=_run(cmd_export))

    p = verbs.add_parser(
        "plot", parents=[common], help="plot the global and per-silo metric per round (PNG)"
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
    def run(args: argparse.Namespace) -> int:
        try:
            with _open_log(args) as log:
                code: int = command(log, args, sys.stdout)
                return code
        except (CommandError, RoundLogError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

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


def _console(out: TextIO) -> Console:
    terminal = out.isatty()
    return Console(file=out, force_terminal=terminal, width=None if terminal else 160)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def lower_is_better(metric: str) -> bool:
    """Losses and errors get worse as they grow; everything else (accuracy, AUC…) as it falls."""
    name = metric.lower()
    return "loss" in name or "error" in name


def worst_silo(summary: RoundSummary, metric: str) -> tuple[str, float] | None:
    """The silo whose `metric` is worst this round, or None if no silo reported it."""
    values = [
        (silo, m[metric])
        for silo, m in summary.silo_metrics.items()
        if metric in m and not math.isnan(m[metric])
    ]
    if not values:
        return None
    pick = max if lower_is_better(metric) else min
    return pick(values, key=lambda item: item[1])


# -- list -------------------------------------------------------------------------------------


def list_rows(summaries: Sequence[RoundSummary], metric: str) -> list[dict[str, Any]]:
    rows = []
    for s in summaries:
        worst = worst_silo(s, metric)
        rows.append(
            {
                "round": s.round_id,
                "status": s.status.value,
                "started_at": s.started_at,
                "duration_s": s.duration_s,
                "aggregation": s.aggregation,
                "invited": s.invited,
                "finished": s.finished,
                "dropped": s.dropped,
                "metric": metric,
                "global": s.global_metrics.get(metric),
                "worst_silo": None if worst is None else worst[0],
                "worst_silo_value": None if worst is None else worst[1],
            }
        )
    return rows


def default_metric(
    summaries: Sequence[RoundSummary], finals: Sequence[FinalEvaluation] = ()
) -> str:
    """The metric `rounds list` shows when none is asked for."""
    names: set[str] = set()
    for s in summaries:
        names.update(s.global_metrics)
        for m in s.silo_metrics.values():
            names.update(m)
    for f in finals:
        names.update(f.global_metrics)
    for preferred in PREFERRED_METRICS:
        if preferred in names:
            return preferred
    return min(names) if names else PREFERRED_METRICS[-1]


def final_rows(finals: Sequence[FinalEvaluation], metric: str) -> list[dict[str, Any]]:
    """`rounds list`'s closing line(s): the final evaluation of the federation's model."""
    rows = []
    for f in finals:
        values = [
            (silo, m[metric])
            for silo, m in f.silo_metrics.items()
            if metric in m and not math.isnan(m[metric])
        ]
        pick = max if lower_is_better(metric) else min
        worst = pick(values, key=lambda item: item[1]) if values else None
        rows.append(
            {
                "round": f.round_id,
                "model_sha256": f.model_sha256,
                "started_at": f.started_at,
                "duration_s": f.duration_s,
                "asked": len(f.asked),
                "answered": len(f.answered),
                "refused": len(f.refusals),
                "metric": metric,
                "global": f.global_metrics.get(metric),
                "worst_silo": None if worst is None else worst[0],
                "worst_silo_value": None if worst is None else worst[1],
            }
        )
    return rows


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
    console = _console(out)
    if not rows:
        console.print(f"The round log {log.path} holds no rounds yet.")
        return 0
    table = Table(title=f"rounds in {log.path}")
    for header in ("#", "status", "started (UTC)", "duration", "invited", "finished", "dropped"):
        table.add_column(header, justify="right" if header not in ("status",) else "left")
    table.add_column(f"global {metric}", justify="right")
    table.add_column(f"worst silo {metric}", justify="left")
    for r in rows:
        worst = (
            "-" if r["worst_silo"] is None else f"{_num(r['worst_silo_value'])} ({r['worst_silo']})"
        )
        table.add_row(
            str(r["round"]),
            r["status"],
            _when(r["started_at"]),
            "-" if r["duration_s"] is None else f"{r['duration_s']:.1f} s",
            str(r["invited"]),
            str(r["finished"]),
            str(r["dropped"]),
            _num(r["global"]),
            worst,
        )
    if final:
        table.add_section()
    for f in final:
        worst = (
            "-" if f["worst_silo"] is None else f"{_num(f['worst_silo_value'])} ({f['worst_silo']})"
        )
        # The final evaluation is not a round: its columns are silos asked / answered / not.
        table.add_row(
            f"final ({f['round']})",
            "evaluated",
            _when(f["started_at"]),
            f"{f['duration_s']:.1f} s",
            str(f["asked"]),
            str(f["answered"]),
            str(f["asked"] - f["answered"]),
            _num(f["global"]),
            worst,
        )
    console.print(table)
    if final:
        console.print(
            "final (N): the federation's final model, round N's, evaluated by the silos "
            "(invited = asked, finished = answered, dropped = no answer); not a round"
        )
    return 0


# -- show -------------------------------------------------------------------------------------


def cmd_show(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    detail = log.round_detail(args.round)
    if args.json:
        out.write(_dumps(detail.to_dict()) + "\n")
        return 0
    _print_detail(_console(out), detail)
    return 0


def _print_detail(console: Console, d: RoundDetail) -> None:
    head = Table(title=f"round {d.round_id}", show_header=False)
    head.add_column("field")
    head.add_column("value")
    duration = "-" if d.duration_s is None else f"{d.duration_s:.2f} s"
    fields: list[tuple[str, str]] = [
        ("status", d.status.value),
        ("started (UTC)", _when(d.started_at)),
        ("ended (UTC)", _when(d.ended_at)),
        ("duration", duration),
        ("aggregation", d.aggregation),
        ("config digest", d.config_digest),
        ("model in", d.model_in_sha256),
        ("model out", d.model_out_sha256 or "-"),
        ("weight sum", _num(d.weight_sum, 2)),
        ("checkpoint", "-" if d.checkpoint is None else f"{d.checkpoint.path}"),
    ]
    if d.rollback_of is not None:
        fields.append(("rolls back to", f"round {d.rollback_of}"))
    if d.abort_reason:
        fields.append(("abort reason", d.abort_reason))
    for key, metric_value in sorted(d.global_metrics.items()):
        fields.append((f"global {key}", _num(metric_value)))
    for key, extra in sorted(d.extra.items()):
        fields.append((key, json.dumps(extra, sort_keys=True)))
    for key, text in fields:
        head.add_row(key, text)
    console.print(head)

    if d.phases:
        phases = Table(title="phases")
        for header in ("phase", "started (UTC)", "duration"):
            phases.add_column(header)
        for p in d.phases:
            phases.add_row(p.phase, _when(p.started_at), f"{p.duration_s:.3f} s")
        console.print(phases)

    sets = Table(title="participants")
    sets.add_column("set")
    sets.add_column("count", justify="right")
    sets.add_column("silos")
    for name, members in d.participants.items():
        sets.add_row(name, str(len(members)), ", ".join(members))
    console.print(sets)

    if d.dropouts:
        drops = Table(title="dropouts")
        for header in ("silo", "phase", "reason"):
            drops.add_column(header)
        for x in d.dropouts:
            drops.add_row(x.silo_id, x.phase, x.reason)
        console.print(drops)

    if d.silos:
        names = sorted({k for s in d.silos for k in s.metrics})
        silos = Table(title="silos (bytes as seen by the coordinator)")
        silos.add_column("silo")
        silos.add_column("bytes in", justify="right")
        silos.add_column("bytes out", justify="right")
        for name in names:
            silos.add_column(name, justify="right")
        for s in d.silos:
            silos.add_row(
                s.silo_id,
                f"{s.bytes_in:,}",
                f"{s.bytes_out:,}",
                *(_num(s.metrics.get(n)) for n in names),
            )
        console.print(silos)

    if d.privacy is not None:
        pv = d.privacy
        console.print(
            f"privacy: {pv.mechanism} noise multiplier {pv.noise_multiplier:g}, clip norm "
            f"{pv.clip_norm:g}, spent epsilon {pv.epsilon:.4g} at delta {pv.delta:g}"
        )
    if d.final_evaluation is not None:
        _print_final(console, d.final_evaluation)


def _print_final(console: Console, f: FinalEvaluation) -> None:
    shown = ", ".join(f"{k} {_num(v)}" for k, v in sorted(f.global_metrics.items())) or "-"
    console.print(
        f"final evaluation of this round's model {f.model_sha256[:12]} "
        f"({_when(f.started_at)} UTC, {f.duration_s:.2f} s): {len(f.answered)} of "
        f"{len(f.asked)} silos answered; global {shown}"
    )
    names = sorted({k for m in f.silo_metrics.values() for k in m})
    table = Table(title="final evaluation per silo")
    table.add_column("silo")
    table.add_column("answer")
    for name in names:
        table.add_column(name, justify="right")
    for silo in f.asked:
        metrics = f.silo_metrics.get(silo)
        if metrics is not None:
            answer = "metrics"
        elif silo in f.refusals:
            answer = f"refused: {f.refusals[silo]}"
        else:
            answer = "no answer"
        table.add_row(silo, answer, *(_num((metrics or {}).get(n)) for n in names))
    console.print(table)


# -- export -----------------------------------------------------------------------------------


def csv_facts(export: Mapping[str, Any]) -> Iterator[tuple[object, ...]]:
    """The export as long-format facts: (round, scope, subject, field, value)."""
    for c in export["checkpoints"]:
        yield (c["round"], "checkpoint", "", "path", c["path"])
        yield (c["round"], "checkpoint", "", "sha256", c["sha256"])
    for r in export["rounds"]:
        n = r["round"]
        for key in (
            "status", "started_at", "ended_at", "duration_s", "aggregation", "config_digest",
            "model_in_sha256", "model_out_sha256", "rollback_of", "weight_sum", "abort_reason",
        ):  # fmt: skip
            yield (n, "round", "", key, r[key])
        for key, value in sorted(r["global_metrics"].items()):
            yield (n, "global_metric", "", key, value)
        for key, value in sorted(r["extra"].items()):
            yield (n, "extra", "", key, json.dumps(value, sort_keys=True))
        for p in r["phases"]:
            for key in ("started_at", "ended_at", "duration_s"):
                yield (n, "phase", p["phase"], key, p[key])
        for name, silos in r["participants"].items():
            for silo in silos:
                yield (n, "participant", name, "silo_id", silo)
        for d in r["dropouts"]:
            yield (n, "dropout", d["silo_id"], "phase", d["phase"])
            yield (n, "dropout", d["silo_id"], "reason", d["reason"])
        for s in r["silos"]:
            yield (n, "silo", s["silo_id"], "bytes_in", s["bytes_in"])
            yield (n, "silo", s["silo_id"], "bytes_out", s["bytes_out"])
            for key, value in sorted(s["metrics"].items()):
                yield (n, "silo_metric", s["silo_id"], key, value)
        if r["privacy"] is not None:
            for key, value in sorted(r["privacy"].items()):
                shown = json.dumps(value, sort_keys=True) if key == "details" else value
                yield (n, "privacy", "", key, shown)
        final = r.get("final_evaluation")
        if final is not None:
            for key in ("model_sha256", "started_at", "ended_at", "duration_s"):
                yield (n, "final_evaluation", "", key, final[key])
            for name in ("asked", "answered"):
                for silo in final[name]:
                    yield (n, "final_participant", name, "silo_id", silo)
            for silo, reason in final["refusals"].items():
                yield (n, "final_refusal", silo, "reason", reason)
            for key, value in sorted(final["global_metrics"].items()):
                yield (n, "final_global_metric", "", key, value)
            for s in final["silos"]:
                for key, value in sorted(s["metrics"].items()):
                    yield (n, "final_silo_metric", s["silo_id"], key, value)


def export_csv(export: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for fact in csv_facts(export):
        writer.writerow(["" if v is None else v for v in fact])
    return buffer.getvalue()


def cmd_export(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    export = log.export()
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


def plot_series(
    log: RoundLog, metric: str
) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str, str]], list[int]]:
    """(series by name — "global" and each silo —, dropouts (round, silo, phase), bad rounds)."""
    series: dict[str, list[tuple[int, float]]] = {}
    dropouts: list[tuple[int, str, str]] = []
    not_completed: list[int] = []
    for s in log.rounds():
        if s.status.value != "completed":
            not_completed.append(s.round_id)
        value = s.global_metrics.get(metric)
        if value is not None and not math.isnan(value):
            series.setdefault("global", []).append((s.round_id, value))
        for silo, metrics in sorted(s.silo_metrics.items()):
            v = metrics.get(metric)
            if v is not None and not math.isnan(v):
                series.setdefault(silo, []).append((s.round_id, v))
        if s.dropped:
            for d in log.round_detail(s.round_id).dropouts:
                dropouts.append((s.round_id, d.silo_id, d.phase))
    return series, dropouts, not_completed


def _known_metrics(log: RoundLog) -> list[str]:
    names: set[str] = set()
    for s in log.rounds():
        names.update(s.global_metrics)
        for m in s.silo_metrics.values():
            names.update(m)
    return sorted(names)


def cmd_plot(log: RoundLog, args: argparse.Namespace, out: TextIO) -> int:
    metric: str = args.metric
    series, dropouts, not_completed = plot_series(log, metric)
    if not series:
        known = _known_metrics(log)
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
    }
    if args.json:
        out.write(_dumps(summary) + "\n")
    else:
        out.write(
            f"wrote {args.output}: {metric} of {len(series) - ('global' in series)} silos"
            f"{' and the global model' if 'global' in series else ''}, "
            f"{len(dropouts)} dropouts marked\n"
        )
    return 0


def _dumps(value: object, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, sort_keys=False, allow_nan=False)
