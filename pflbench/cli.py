"""The ``pflbench`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pflbench.registry import RegistryError, registry
from pflbench.suite import Suite, SuiteError, load_suite

console = Console(stderr=True)
out_console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pflbench")
def main() -> None:
    """Personalized federated learning benchmarks for multi-site medical image segmentation."""


def _load(suite_path: str) -> Suite:
    try:
        return load_suite(suite_path)
    except SuiteError as exc:
        _fail(str(exc))
        raise  # unreachable


def default_out(suite: Suite, suite_path: str) -> Path:
    return Path(suite.out) if suite.out else Path("runs") / Path(suite_path).stem


@main.command()
@click.argument("suite_path", metavar="SUITE")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder (default: the suite's `out`, else runs/<suite name>).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.option("--no-report", is_flag=True, help="Skip the report at the end.")
def run(suite_path: str, out: str | None, quiet: bool, no_report: bool) -> None:
    """Run every dataset × method × seed of SUITE (finished runs are skipped)."""
    from pflbench.runner import plan, run_suite
    from pflbench.summary import dice_table, write_summary

    suite = _load(suite_path)
    out_dir = Path(out) if out else default_out(suite, suite_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = plan(suite)
    t_start = time.perf_counter()
    skipped = 0
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        runs_task = progress.add_task("runs", total=len(cells))
        round_task = progress.add_task("rounds", total=suite.protocol.rounds)

        def start(spec, i, n):
            progress.update(
                round_task,
                completed=0,
                description=f"{spec.dataset.key} · {spec.method.key} · seed {spec.seed}",
            )

        def end(spec, key, manifest):
            nonlocal skipped
            if manifest is None:
                skipped += 1
            elif manifest.get("status") == "diverged":
                console.print(f"[yellow]diverged:[/] {key}: {manifest.get('error')}")
            progress.advance(runs_task)

        def on_round(r, total):
            progress.update(round_task, completed=r, total=total)

        try:
            run_suite(suite, out_dir, on_run_start=start, on_run_end=end, on_round=on_round)
        except (SuiteError, RegistryError, ValueError) as exc:
            _fail(str(exc))
    wall = time.perf_counter() - t_start
    table, split = dice_table(out_dir)
    summary = write_summary(out_dir)
    if not table.empty:
        t = Table(title=f"Dice ({split}, best-validation round; mean ± std over seeds)")
        t.add_column("dataset")
        t.add_column("method")
        for c in table.columns:
            t.add_column(str(c), justify="right")
        for (ds, m), row in table.iterrows():
            t.add_row(ds, m, *[str(v) if isinstance(v, str) else "–" for v in row])
        out_console.print(t)
    console.print(
        f"{len(cells)} runs ({skipped} already done) in {wall:.1f} s → {out_dir}"
        + (f"; summary: {summary}" if summary else "")
    )
    if not no_report:
        try:
            from pflbench.report import build_report
        except ImportError:
            return
        try:
            path = build_report(out_dir)
            console.print(f"report: {path}")
        except Exception as exc:  # a report problem never loses the finished runs
            console.print(f"[yellow]report failed:[/] {type(exc).__name__}: {exc}")


@main.command(name="list")
@click.argument("kind", type=click.Choice(["methods", "datasets", "models"]))
def list_(kind: str) -> None:
    """List the installed methods, datasets or models (built-in and plugins)."""
    reg = registry(kind)
    t = Table(title=f"{kind} ({reg.group})")
    t.add_column("name")
    t.add_column("source")
    t.add_column("summary")
    eps = reg.entry_points()
    for name in reg.names():
        try:
            obj = reg.load(name)
            doc = (getattr(obj, "__doc__", "") or "").strip().splitlines()
            t.add_row(name, eps[name].value, doc[0] if doc else "")
        except RegistryError:
            t.add_row(name, eps[name].value, f"[red]failed to import: {reg.errors.get(name)}[/]")
    out_console.print(t)


@main.command()
@click.argument("method")
def show(method: str) -> None:
    """Show a method's paper, hyperparameters, defaults and search ranges."""
    try:
        cls = registry("methods").load(method)
    except RegistryError as exc:
        _fail(str(exc))
    out_console.print(f"[bold]{method}[/] — {getattr(cls, 'paper', '')}")
    out_console.print((cls.__doc__ or "").strip())
    t = Table(title="hyperparameters")
    for col in ("name", "default", "search space", "help"):
        t.add_column(col)
    for name, p in getattr(cls, "params", {}).items():
        t.add_row(name, repr(p.default), p.describe(), p.help)
    out_console.print(t)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--reference", help="Reference method of the comparison (default: fedavg if present)."
)
@click.option("--metric", default="dice", type=click.Choice(["dice", "iou", "hd95", "assd"]))
@click.option(
    "--out", type=click.Path(file_okay=False), help="Report folder (default RUN_DIR/report)."
)
def report(run_dir: str, reference: str | None, metric: str, out: str | None) -> None:
    """Statistics, LaTeX tables, figures, Markdown and HTML from a run folder."""
    try:
        from pflbench.report import build_report
    except ImportError as exc:
        _fail(f"the report module is unavailable: {exc}")
    path = build_report(
        Path(run_dir), out=Path(out) if out else None, reference=reference, metric=metric
    )
    out_console.print(f"report written to {path}")


@main.group()
def data() -> None:
    """Inspect dataset folders."""


@data.command()
@click.argument("name")
@click.option("--root", required=True, type=click.Path(), help="The dataset folder.")
def check(name: str, root: str) -> None:
    """List counts and every problem of a dataset folder; exit 1 if any problem is found."""
    from pflbench.data import DataError

    try:
        cls = registry("datasets").load(name)
    except RegistryError as exc:
        _fail(str(exc))
    from pflbench.datasets._io import format_check

    try:
        report = cls(root=root).check()
    except DataError as exc:
        _fail(str(exc))
    out_console.print(format_check(report))
    if report.problems:
        out_console.print(f"{len(report.problems)} problem(s) found")
        sys.exit(1)
    out_console.print("no problems found")


if __name__ == "__main__":
    main()
