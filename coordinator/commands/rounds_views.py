"""What `silofed-coordinator rounds` shows, computed from the round log's records: the rows of
`list`, the tables of `list` and `show`, the long-format CSV of `export`, the series of `plot`.

Rule: pure presentation: a function here reads only the records (or the log's read queries) it
is given and returns rows or prints to the console it is given; argument parsing, files and exit
codes are coordinator.commands.rounds'. The spread across silos (mean, worst, best, std, n) is
computed only by coordinator.commands.rounds_spread.spread, for all four subcommands.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Column, Table

from coordinator.commands.rounds_spread import (
    EVAL_PREFIX,
    Spread,
    eval_spreads,
    lower_is_better,
    spread,
    spread_columns,
)
from coordinator.storage.roundlog import FinalEvaluation, RoundDetail, RoundLog, RoundSummary
from secagg.identity import SiloId

# Silo agents report their evaluation of the received global model as `eval_*`; tasks name
# their metrics freely, so `rounds list` picks the first of these the log holds.
PREFERRED_METRICS = ("eval_accuracy", "accuracy")
CSV_FIELDS = ("round", "scope", "subject", "field", "value")


def console_for(out: TextIO) -> Console:
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


def _metric_columns(
    metric: str, global_value: float | None, across: Spread | None
) -> dict[str, Any]:
    """The columns every `rounds list` row ends with: the metric globally, its worst silo, and
    its spread across silos."""
    return {
        "metric": metric,
        "global": None if global_value is None or math.isnan(global_value) else global_value,
        "worst_silo": None if across is None else across.worst_silo,
        "worst_silo_value": None if across is None else across.worst,
        "spread": None if across is None else across.to_dict(),
    }


def _worst_cell(row: Mapping[str, Any]) -> str:
    """The worst silo's value and name (its id's last segment: the table must fit a terminal;
    `--json` has the whole id)."""
    if row["worst_silo"] is None:
        return "-"
    return f"{_num(row['worst_silo_value'])} ({_short(row['worst_silo'])})"


def _short(silo_id: str) -> str:
    return silo_id.rsplit("/", 1)[-1]


def _spread_cell(across: Mapping[str, Any] | None) -> str:
    """`rounds list`'s compact spread column: mean ± std (n); the worst has its own column."""
    if across is None:
        return "-"
    return f"{_num(across['mean'])} ± {_num(across['std'])} ({across['n']})"


# -- list -------------------------------------------------------------------------------------


def list_rows(summaries: Sequence[RoundSummary], metric: str) -> list[dict[str, Any]]:
    rows = []
    for s in summaries:
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
                **_metric_columns(
                    metric, s.global_metrics.get(metric), spread(s.silo_metrics, metric)
                ),
            }
        )
    return rows


def default_metric(
    summaries: Sequence[RoundSummary], finals: Sequence[FinalEvaluation] = ()
) -> str:
    """The metric `rounds list` shows when none is asked for: eval_accuracy, else accuracy,
    else the first `eval_*` metric, else the first metric (alphabetically)."""
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
    evaluated = sorted(n for n in names if n.startswith(EVAL_PREFIX))
    if evaluated:
        return evaluated[0]
    return min(names) if names else PREFERRED_METRICS[-1]


def final_rows(finals: Sequence[FinalEvaluation], metric: str) -> list[dict[str, Any]]:
    """`rounds list`'s closing line(s): the final evaluation of the federation's model."""
    rows = []
    for f in finals:
        rows.append(
            {
                "round": f.round_id,
                "model_sha256": f.model_sha256,
                "started_at": f.started_at,
                "duration_s": f.duration_s,
                "asked": len(f.asked),
                "answered": len(f.answered),
                "refused": len(f.refusals),
                **_metric_columns(
                    metric, f.global_metrics.get(metric), spread(f.silo_metrics, metric)
                ),
            }
        )
    return rows


def print_rounds(
    console: Console,
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    final: Sequence[Mapping[str, Any]],
    metric: str,
) -> None:
    """`rounds list` as a table: `list_rows` then `final_rows`, under one header."""
    if not rows:
        console.print(f"The round log {path} holds no rounds yet.")
        return
    table = Table(title=f"rounds in {path}")
    for header in ("#", "status", "started (UTC)", "duration", "invited", "finished", "dropped"):
        table.add_column(header, justify="right" if header not in ("status",) else "left")
    table.add_column(f"global {metric}", justify="right")
    table.add_column(f"worst silo {metric}", justify="left")
    table.add_column("silos: mean ± std (n)", justify="right")
    for r in rows:
        worst = _worst_cell(r)
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
            _spread_cell(r["spread"]),
        )
    if final:
        table.add_section()
    for f in final:
        worst = _worst_cell(f)
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
            _spread_cell(f["spread"]),
        )
    console.print(table)
    if final:
        console.print(
            "final (N): the federation's final model, round N's, evaluated by the silos "
            "(invited = asked, finished = answered, dropped = no answer); not a round"
        )
    console.print(
        f"worst silo, silos: {metric} across every silo that reported it (n of them; "
        f"population std); the worst is the {'highest' if lower_is_better(metric) else 'lowest'}"
    )


# -- show -------------------------------------------------------------------------------------


def _table(
    title: str,
    columns: Sequence[str | Column],
    rows: Iterable[Sequence[str]],
    *,
    show_header: bool = True,
) -> Table:
    """A titled table of `rows`: a str column is left-justified, a Column says its own way."""
    table = Table(*columns, title=title, show_header=show_header)
    for row in rows:
        table.add_row(*row)
    return table


def _right(header: str) -> Column:
    """A right-justified column (counts, bytes, metrics)."""
    return Column(header, justify="right")


def print_detail(console: Console, d: RoundDetail) -> None:
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
    console.print(_table(f"round {d.round_id}", ("field", "value"), fields, show_header=False))

    if d.phases:
        phases = [(p.phase, _when(p.started_at), f"{p.duration_s:.3f} s") for p in d.phases]
        console.print(_table("phases", ("phase", "started (UTC)", "duration"), phases))

    sets = [
        (name, str(len(members)), ", ".join(members)) for name, members in d.participants.items()
    ]
    console.print(_table("participants", ("set", _right("count"), "silos"), sets))

    if d.dropouts:
        drops = [(x.silo_id, x.phase, x.reason) for x in d.dropouts]
        console.print(_table("dropouts", ("silo", "phase", "reason"), drops))

    if d.silos:
        names = sorted({k for s in d.silos for k in s.metrics})
        columns: list[str | Column] = [
            "silo",
            _right("bytes in"),
            _right("bytes out"),
            *map(_right, names),
        ]
        stats = [
            (
                s.silo_id,
                f"{s.bytes_in:,}",
                f"{s.bytes_out:,}",
                *(_num(s.metrics.get(n)) for n in names),
            )
            for s in d.silos
        ]
        console.print(_table("silos (bytes as seen by the coordinator)", columns, stats))
        _print_spreads(
            console, "eval_* metrics across silos", {s.silo_id: s.metrics for s in d.silos}
        )

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
    rows: list[tuple[str, ...]] = []
    for silo in f.asked:
        metrics = f.silo_metrics.get(silo)
        if metrics is not None:
            answer = "metrics"
        elif silo in f.refusals:
            answer = f"refused: {f.refusals[silo]}"
        else:
            answer = "no answer"
        rows.append((silo, answer, *(_num((metrics or {}).get(n)) for n in names)))
    columns: list[str | Column] = ["silo", "answer", *map(_right, names)]
    console.print(_table("final evaluation per silo", columns, rows))
    _print_spreads(console, "final evaluation: eval_* metrics across silos", f.silo_metrics)


def _print_spreads(
    console: Console, title: str, silo_metrics: Mapping[SiloId, Mapping[str, float]]
) -> None:
    """One row per `eval_*` metric: n, mean, std, worst and best with their silos."""
    spreads = eval_spreads(silo_metrics)
    if not spreads:
        return
    columns: list[str | Column] = [
        "metric",
        _right("n"),
        _right("mean"),
        _right("std"),
        _right("worst"),
        "worst silo",
        _right("best"),
        "best silo",
    ]
    rows = [
        (
            f"{name} ({'higher' if lower_is_better(name) else 'lower'} is worse)",
            str(x.n),
            _num(x.mean),
            _num(x.std),
            _num(x.worst),
            x.worst_silo,
            _num(x.best),
            x.best_silo,
        )
        for name, x in spreads.items()
    ]
    console.print(_table(title, columns, rows))


# -- export (and `show --json`) -----------------------------------------------------------------


def with_spread(round_doc: Mapping[str, Any]) -> dict[str, Any]:
    """A round in its export form (`RoundDetail.to_dict`) with `spread` added: every `eval_*`
    metric's `<metric>_n/_mean/_std/_worst/_worst_silo/_best/_best_silo` across its silos; its
    final evaluation, if any, gets its own `spread` the same way."""
    doc = dict(round_doc)
    doc["spread"] = spread_columns(_silo_metrics(doc["silos"]))
    final = doc.get("final_evaluation")
    if final is not None:
        doc["final_evaluation"] = {**final, "spread": spread_columns(_silo_metrics(final["silos"]))}
    return doc


def export_with_spread(export: Mapping[str, Any]) -> dict[str, Any]:
    """`RoundLog.export()` with `with_spread` applied to every round."""
    return {**export, "rounds": [with_spread(r) for r in export["rounds"]]}


def _silo_metrics(silos: Iterable[Mapping[str, Any]]) -> dict[SiloId, dict[str, float]]:
    # The export writes a non-finite metric as null; the spread leaves those out anyway.
    return {
        SiloId(s["silo_id"]): {k: float(v) for k, v in s["metrics"].items() if v is not None}
        for s in silos
    }


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
        for key, value in r.get("spread", {}).items():
            yield (n, "spread", "", key, value)
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
            for key, value in final.get("spread", {}).items():
                yield (n, "final_spread", "", key, value)


def export_csv(export: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for fact in csv_facts(export):
        writer.writerow(["" if v is None else v for v in fact])
    return buffer.getvalue()


# -- plot -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlotData:
    """What `rounds plot` draws for one metric."""

    series: dict[str, list[tuple[int, float]]]  # "global" and each silo: (round, value)
    dropouts: list[tuple[int, str, str]]  # (round, silo, phase)
    not_completed: list[int]  # rounds shaded grey
    spreads: list[tuple[int, Spread]]  # (round, the metric across silos), rounds with one


def plot_series(log: RoundLog, metric: str) -> PlotData:
    """Everything `rounds plot` draws for `metric`, from the log's rounds."""
    series: dict[str, list[tuple[int, float]]] = {}
    dropouts: list[tuple[int, str, str]] = []
    not_completed: list[int] = []
    spreads: list[tuple[int, Spread]] = []
    for s in log.rounds():
        if s.status.value != "completed":
            not_completed.append(s.round_id)
        across = spread(s.silo_metrics, metric)
        if across is not None:
            spreads.append((s.round_id, across))
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
    return PlotData(series, dropouts, not_completed, spreads)


def known_metrics(log: RoundLog) -> list[str]:
    names: set[str] = set()
    for s in log.rounds():
        names.update(s.global_metrics)
        for m in s.silo_metrics.values():
            names.update(m)
    return sorted(names)
