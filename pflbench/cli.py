"""The ``pflbench`` command line."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pflbench.registry import RegistryError, registry
from pflbench.suite import MAX_WORKERS, Suite, SuiteError, load_suite

console = Console(stderr=True)
# wide tables stay readable in logs and pipes (rich would otherwise wrap them at 80 columns)
out_console = Console(width=None if sys.stdout.isatty() else 200)


def _fail(message: str) -> None:
    # escape: messages quote user text such as "fedavg [rounds=3]", which is not markup
    console.print(
        f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True
    )
    sys.exit(2)


class _Group(click.Group):
    """Ctrl-C (or SIGTERM to ``run``) ends with exit 130, the shell's code for an interrupt,
    instead of click's "Aborted!" and 1; finished runs are on disk already."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            console.print("interrupted: finished runs are kept; the same command resumes")
            ctx.exit(130)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pflbench")
def main() -> None:
    """Personalized federated learning benchmarks for multi-site medical image segmentation."""


def _load(suite_path: str, overrides: tuple[str, ...] = ()) -> Suite:
    try:
        return load_suite(suite_path, overrides)
    except SuiteError as exc:
        _fail(str(exc))
        raise  # unreachable


def _workers_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--workers N`` or ``--workers auto`` (as the suite's ``workers`` accepts)."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1 or n > MAX_WORKERS:
        raise click.BadParameter(
            f"{value!r}: expected 'auto' or an integer from 1 to {MAX_WORKERS}"
        )
    return n


SET_OPTION = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a suite key (dotted path, YAML value; repeatable), validated like the file: "
    "--set protocol.rounds=2 --set seeds=[0] --set datasets.0.options.size=32.",
)
DRY_RUN_OPTION = click.option(
    "--dry-run",
    is_flag=True,
    help="List the planned runs (run key, DONE or not) and totals; train nothing.",
)


def _run_overrides(overrides: tuple[str, ...], threads: int | None) -> tuple[str, ...]:
    return overrides + ((f"protocol.threads={threads}",) if threads is not None else ())


def _dry_run(suite: Suite, out_dir: Path) -> None:
    """Print what a run would do; nothing is trained or written."""
    from pflbench.runner import planned_runs, protocol_differences

    _print_protocols(suite, protocol_differences(suite))
    if suite.tuning is not None:
        from pflbench.results import iter_runs
        from pflbench.runner import planned_studies

        plan_ = planned_studies(suite)
        t = Table(title=f"{suite.name}: tuning plan (nothing is run)")
        for col in ("dataset", "method", "trials", "tuning seeds", "final runs"):
            t.add_column(col)
        seeds = ",".join(map(str, suite.seeds))
        for r in plan_.itertuples():
            t.add_row(
                r.dataset,
                r.method,
                str(r.trials),
                r.tuning_seeds,
                f"{r.final_runs} (tuned + default × seeds {seeds})",
            )
        out_console.print(t)
        done = sum(1 for _ in iter_runs(out_dir)) if out_dir.is_dir() else 0
        out_console.print(
            f"{len(plan_)} studies × {suite.tuning.trials} trials + {int(plan_.final_runs.sum())} "
            f"final runs (a tuned configuration equal to the default is run once); {done} "
            f"finished runs already in {out_dir}"
        )
        return
    rows = planned_runs(suite, out_dir)
    t = Table(title=f"{suite.name}: planned runs → {out_dir}")
    for col in ("dataset", "method", "label", "seed", "run key", "status"):
        t.add_column(col)
    for r in rows.itertuples():
        t.add_row(
            r.dataset, r.method, r.label, str(r.seed), r.run_key, "DONE" if r.done else "to run"
        )
    out_console.print(t)
    done = int(rows["done"].sum())
    out_console.print(
        f"{len(rows)} runs: {done} DONE, {len(rows) - done} to run ({_rounds(suite)})"
    )


def _rounds(suite: Suite) -> str:
    rounds = sorted({suite.protocol_for(d).rounds for d in suite.datasets})
    return (
        f"{rounds[0]} rounds each"
        if len(rounds) == 1
        else f"{'/'.join(map(str, rounds))} rounds by dataset"
    )


def _print_protocols(suite: Suite, differences: dict[str, list[str]]) -> None:
    p = suite.protocol
    budget = f"E={p.local_epochs}" if p.local_steps is None else f"{p.local_steps} steps"
    out_console.print(
        f"protocol: T={p.rounds}, {budget}, batch {p.batch_size}, {p.optimizer.name} "
        f"lr {p.optimizer.lr:g}, weights ∝ {p.aggregation_weights}, optimizer state "
        f"{p.optimizer_state}",
        highlight=False,
    )
    if not any(differences.values()):
        return
    t = Table(title="per-dataset protocol (differs from the suite's)")
    t.add_column("dataset")
    t.add_column("protocol")
    for name, diffs in differences.items():
        t.add_row(name, ", ".join(diffs) or "the suite's")
    out_console.print(t)


def _preflight_or_fail(suite: Suite, out_dir: Path, planned: int, children=None) -> None:
    from pflbench.preflight import preflight

    problems = preflight(suite, out_dir, planned)
    if problems:
        if children:
            from pflbench.pool import stop_children

            stop_children(children)
        for p in problems:
            console.print(f"[bold red]error:[/] {p}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)


def default_out(suite: Suite, suite_path: str) -> Path:
    return Path(suite.out) if suite.out else Path("runs") / Path(suite_path).stem


def _probe_per_gpu(suite: Any) -> int:
    """``workers_per_gpu: auto``: measure, then say what was chosen and why."""
    from pflbench.packing import auto_per_gpu

    per, peak, total = auto_per_gpu(suite)
    console.print(
        f"workers_per_gpu auto: {per} per GPU (probe peak {peak:.0f} MiB of {total:.0f} MiB)"
    )
    return per


@main.command()
@click.argument("suite_path", metavar="SUITE")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder (default: the suite's `out`, else runs/<suite name>).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.option("--no-report", is_flag=True, help="Skip the report at the end.")
@click.option(
    "--workers",
    callback=_workers_option,
    metavar="N|auto",
    help="Local worker processes taking runs from the storage queue; CPU threads (or GPUs) "
    "are split between them; auto: one per `threads` CPUs. Default: the suite's `workers` "
    "(1 unless it says otherwise).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Torch CPU threads per run (the suite's protocol.threads; not part of the run key).",
)
@SET_OPTION
@DRY_RUN_OPTION
@click.option(
    "--storage",
    envvar="PFLBENCH_STORAGE",
    help="Optuna storage of the sweep (default: a journal file in the run folder): "
    "journal:PATH, or postgresql+psycopg://USER@HOST/DB for workers on many machines. "
    "Env: PFLBENCH_STORAGE.",
)
def run(
    suite_path: str,
    out: str | None,
    quiet: bool,
    no_report: bool,
    workers: int | str | None = None,
    storage: str | None = None,
    threads: int | None = None,
    overrides: tuple[str, ...] = (),
    dry_run: bool = False,
) -> None:
    """Run every dataset × method × seed of SUITE (finished runs are skipped).

    A suite with a `tuning` section, more than one worker (--workers, or the suite's `workers`)
    or --storage goes through the Optuna storage (a killed sweep resumes; more machines can join
    with `pflbench worker`).
    """
    from pflbench.pool import choose_workers, start_children, visible_gpus

    # SIGTERM (a scheduler's stop) unwinds like Ctrl-C: child workers are stopped, each closing
    # its trial for a retry, and the exit code is 130
    signal.signal(signal.SIGTERM, _terminate)

    overrides = _run_overrides(overrides, threads)
    # The suite is validated before any worker starts, so an invalid suite gives one error and
    # no child process (children then load it again, and wait until the sweep exists).
    suite = _load(suite_path, overrides)
    if dry_run:
        _dry_run(suite, Path(out) if out else default_out(suite, suite_path))
        return
    workers = choose_workers(
        workers,
        suite.workers,
        suite.protocol.threads,
        suite.workers_per_gpu,
        visible_gpus() if suite.workers_per_gpu is not None else [],
        probe=lambda: _probe_per_gpu(suite),
    )
    children = start_children(suite_path, out, storage, workers, overrides) if workers > 1 else None
    out_dir = Path(out) if out else default_out(suite, suite_path)
    sweep = suite.tuning is not None or workers > 1 or storage is not None

    from pflbench.runner import plan, run_suite
    from pflbench.summary import dice_table, write_summary

    cells = plan(suite)
    _preflight_or_fail(suite, out_dir, len(cells), children)
    from pflbench.report.published import write as write_published

    write_published(suite.report, out_dir)  # the suite's published values, for the report
    from pflbench.report.expectations import write as write_expectations

    write_expectations(suite.expect, out_dir)  # the suite's claims, judged by the report
    n_runs = len(cells)
    t_start = time.perf_counter()
    skipped = 0
    unwritten: list[str] = []  # runs that trained but could not be written (a full disk)
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

        def failed(spec, exc):
            unwritten.append(exc.run_key)
            console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            progress.advance(runs_task)

        try:
            if sweep:
                from pflbench.worker import run_sweep

                result = run_sweep(
                    suite,
                    suite_path,
                    out_dir,
                    storage,
                    workers,
                    quiet=quiet,
                    progress=None if quiet else progress,
                    children=children,
                )
                n_runs, skipped = result.runs, result.skipped
            else:
                run_suite(
                    suite,
                    out_dir,
                    on_run_start=start,
                    on_run_end=end,
                    on_round=on_round,
                    on_run_error=failed,
                )
        except (SuiteError, RegistryError, ValueError) as exc:
            _fail(str(exc))
    wall = time.perf_counter() - t_start
    table, split = dice_table(out_dir)
    summary = write_summary(out_dir, (table, split))
    if not table.empty:
        t = Table(title=f"Dice ({split}, best-validation round; mean ± std over seeds)")
        t.add_column("dataset")
        t.add_column("method")
        for c in table.columns:
            t.add_column(str(c), justify="right")
        for (ds, m), row in table.iterrows():
            t.add_row(ds, escape(m), *[str(v) if isinstance(v, str) else "–" for v in row])
        out_console.print(t)
    console.print(
        f"{n_runs} runs ({skipped} already done) in {wall:.1f} s → {out_dir}"
        + (f"; summary: {summary}" if summary else "")
    )
    if not no_report:
        _report(out_dir)
    if unwritten:
        console.print(
            f"{len(unwritten)} run(s) could not be written ({', '.join(unwritten)}); free space "
            "and run the same command again: it redoes only those",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


def _report(out_dir: Path) -> None:
    """Build the report of ``out_dir`` (when the report extra is installed)."""
    try:
        from pflbench.report import build_report
    except ImportError:
        return
    try:
        path = build_report(out_dir)
        console.print(f"report: {path}")
        print_expectations(path)
    except Exception as exc:  # a report problem never loses the finished runs
        console.print(f"[yellow]report failed:[/] {type(exc).__name__}: {exc}")


def print_expectations(report_dir: Path) -> Any:
    """Print the report's expectations table (if the run has expectations); returns its rows."""
    import pandas as pd

    from pflbench.report import expectations as ex

    path = Path(report_dir) / "tables" / ex.CSV
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    cells = ex.table(frame).cells
    t = Table(title="Expectations (Holm over the expectations; see report.md for the procedure)")
    t.add_column("claim")
    for c in cells.columns:
        t.add_column(str(c), justify="left" if c in ("Source", "Verdict") else "right")
    for claim, row in cells.iterrows():
        t.add_row(escape(str(claim)), *[escape(str(v)) for v in row])
    out_console.print(t)
    return frame


@main.command()
@click.argument("suite_path", metavar="SUITE")
@click.option(
    "--storage",
    envvar="PFLBENCH_STORAGE",
    help="Optuna storage of the sweep to join (default: the journal file in the run folder). "
    "Env: PFLBENCH_STORAGE.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder (default: the suite's `out`, else runs/<suite name>); share it between "
    "machines, or copy the results/ folders together afterwards.",
)
@click.option("--threads", type=click.IntRange(min=1), help="Torch CPU threads (default: all).")
@SET_OPTION
@DRY_RUN_OPTION
@click.option("--index", type=click.IntRange(min=0), hidden=True)
@click.option("--wait-go", is_flag=True, hidden=True)
@click.option("--quiet", "-q", is_flag=True, help="Only errors.")
def worker(
    suite_path: str,
    storage: str | None,
    out: str | None,
    threads: int | None,
    index: int | None,
    quiet: bool,
    wait_go: bool = False,
    overrides: tuple[str, ...] = (),
    dry_run: bool = False,
) -> None:
    """Join the sweep of SUITE in --storage and take runs until none is left."""
    from pflbench.worker import worker_main

    if wait_go:  # a child of `pflbench run --workers N`: imports done, wait for the sweep
        from pflbench.pool import wait_for_go

        if not wait_for_go():
            return  # the parent stopped before setting the sweep up; it reports why
    suite = _load(suite_path, overrides)
    out_dir = Path(out) if out else default_out(suite, suite_path)
    if dry_run:
        _dry_run(suite, out_dir)
        return
    if not wait_go:  # a child's parent made these checks already
        from pflbench.runner import plan

        _preflight_or_fail(suite, out_dir, len(plan(suite)))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        stats = worker_main(suite, out_dir, storage, threads=threads, index=index, quiet=quiet)
    except (SuiteError, RegistryError, ValueError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    if not quiet:
        console.print(
            f"worker done: {stats.trials} trials ({stats.complete} complete, {stats.pruned} "
            f"pruned, {stats.failed} failed); {stats.reaped} dead workers' trials re-enqueued"
        )


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
            t.add_row(name, eps[name].value, _summary(reg.load(name)))
        except RegistryError:
            t.add_row(name, eps[name].value, f"[red]failed to import: {reg.errors.get(name)}[/]")
    out_console.print(t)


def _summary(obj: object) -> str:
    """A plugin's one-line summary: its declared ``description``, else its docstring's first line."""
    description = getattr(obj, "description", "")
    if isinstance(description, str) and description.strip():
        return description.strip()
    doc = (getattr(obj, "__doc__", "") or "").strip().splitlines()
    return doc[0] if doc else ""


def _find_plugin(name: str) -> tuple[str, object]:
    """The kind and class of ``name``: methods first, then datasets, then models."""
    import difflib

    kinds = ("methods", "datasets", "models")
    for kind in kinds:
        reg = registry(kind)
        if name in reg.names() or (":" in name and kind == "methods"):
            try:
                return kind, reg.load(name)
            except RegistryError as exc:
                _fail(str(exc))
    known = {k: registry(k).names() for k in kinds}
    close = difflib.get_close_matches(name, [n for v in known.values() for n in v], n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in known.items())
    _fail(f"unknown method, dataset or model {name!r}{hint} ({listing})")
    raise AssertionError  # unreachable


@main.command()
@click.argument("name")
def show(name: str) -> None:
    """Show a method (paper, hyperparameters, defaults, search ranges), a dataset (options,
    source, licence, how to get it, citation, expected folder layout; as docs/datasets.md) or a
    model (options)."""
    kind, cls = _find_plugin(name)
    if kind == "methods":
        out_console.print(f"[bold]{name}[/] — {getattr(cls, 'paper', '')}")
        out_console.print((cls.__doc__ or "").strip())
        t = Table(title="hyperparameters")
        for col in ("name", "default", "search space", "accepts", "help"):
            t.add_column(col)
        for pname, p in getattr(cls, "params", {}).items():
            t.add_row(pname, repr(p.default), p.describe(), p.accepts() or "any", p.help)
        out_console.print(t)
        return
    out_console.print(f"[bold]{name}[/] ({kind[:-1]}) — {_summary(cls)}")
    out_console.print((cls.__doc__ or "").strip())
    t = Table(title="options")
    t.add_column("option")
    t.add_column("default")
    for oname, default in _init_options(cls).items():
        t.add_row(oname, default)
    out_console.print(t)
    for field, title in (
        ("source", "source"),
        ("homepage", "project page"),
        ("licence", "licence"),
        ("access", "how to get it"),
        ("citation", "cite"),
    ):
        if getattr(cls, field, ""):
            out_console.print(f"[bold]{title}:[/] {getattr(cls, field)}", highlight=False)
    tree = getattr(cls, "expected_tree", "")
    if tree:
        out_console.print(
            "[bold]expected layout[/] (`pflbench data check " + name + " --root DIR`):"
        )
        out_console.print(tree.strip("\n"), markup=False, highlight=False)


def _init_options(cls: type) -> dict[str, str]:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {
        k: ("required" if p.default is inspect.Parameter.empty else repr(p.default))
        for k, p in params.items()
        if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--reference", help="Reference method of the comparison (default: fedavg if present)."
)
@click.option("--metric", default="dice", type=click.Choice(["dice", "iou", "hd95", "assd"]))
@click.option(
    "--practical",
    type=float,
    default=0.01,
    show_default=True,
    help="Practical threshold in metric units.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder (default RUN_DIR/report).",
)
@click.option(
    "--select",
    "select",
    multiple=True,
    metavar="KEY=VALUE",
    help="Report only runs whose configuration has KEY=VALUE (dotted keys as the refusal "
    "message lists them, e.g. protocol.rounds=3); repeatable.",
)
@click.option(
    "--split-configs",
    is_flag=True,
    help="Show each configuration of a method as its own row instead of refusing the folder.",
)
@click.option(
    "--check-expectations",
    is_flag=True,
    help="Exit with status 1 when the results contradict one of the suite's expectations "
    "(its `expect` section); status 2 when the run folder has none.",
)
def report(
    run_dir: Path,
    reference: str | None,
    metric: str,
    practical: float,
    out: Path | None,
    select: tuple[str, ...],
    split_configs: bool,
    check_expectations: bool = False,
) -> None:
    """Statistics, LaTeX tables, figures, Markdown and HTML from a run folder's tidy results."""
    from pflbench.configs import ConfigError, parse_select
    from pflbench.report import ReportError, build_report

    try:
        path = build_report(
            run_dir,
            out=out,
            reference=reference,
            metric=metric,
            practical=practical,
            select=parse_select(select),
            split_configs=split_configs,
        )
    except (ReportError, ConfigError) as exc:
        _fail(str(exc))
    out_console.print(f"report written to {path}")
    frame = print_expectations(path)
    if not check_expectations:
        return
    if frame is None:
        _fail(f"{run_dir}: no expectations to check (the suite has no `expect` section)")
    from pflbench.report.expectations import contradicted

    bad = contradicted(frame)
    for r in bad.itertuples():
        console.print(f"[bold red]contradicted:[/] {escape(str(r.claim))}", highlight=False)
    if len(bad):
        sys.exit(1)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--baseline",
    "baseline_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("reports/baselines/ci.json"),
    show_default=True,
    help="Baseline JSON to compare with (or to write with --update).",
)
@click.option(
    "--update",
    is_flag=True,
    help="Write a new baseline from RUN_DIR (bands calibrated over its seeds) instead of comparing.",
)
@click.option(
    "--k",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --update: band half-width in standard deviations over seeds [default: 3].",
)
@click.option(
    "--floor",
    type=click.FloatRange(min=0),
    default=None,
    help="With --update: smallest band half-width in Dice [default: 0.02].",
)
def regress(
    run_dir: Path, baseline_path: Path, update: bool, k: float | None, floor: float | None
) -> None:
    """Accuracy regression gate: client-macro Dice per method and site against the baseline's
    bands; exits 1 on any regression or missing method (2 on unusable input)."""
    from pflbench.regress import main_regress

    sys.exit(main_regress(run_dir, baseline_path, update=update, k=k, floor=floor))


@main.group()
def data() -> None:
    """Inspect dataset folders."""


@data.command()
@click.argument("name")
@click.option("--root", required=True, type=click.Path(), help="The dataset folder.")
@click.option(
    "--sites",
    help="Comma-separated sites to check (a partial copy of a dataset), e.g. RUNMC,BMC.",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A loader option, as in the suite's `options` (YAML value); repeatable.",
)
def check(name: str, root: str, sites: str | None, options: tuple[str, ...]) -> None:
    """List counts and every problem of a dataset folder; exit 1 if any problem is found."""
    import yaml

    from pflbench.data import DataError

    try:
        cls = registry("datasets").load(name)
    except RegistryError as exc:
        _fail(str(exc))
    from pflbench.datasets._io import format_check

    kwargs: dict[str, object] = {"root": root}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--option {item!r}: expected KEY=VALUE")
        kwargs[key.strip()] = yaml.safe_load(value)
    if sites:
        kwargs["sites"] = [s.strip() for s in sites.split(",") if s.strip()]
    known = _init_options(cls)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        _fail(f"dataset {name!r} has no option(s) {unknown}; its options: {', '.join(known)}")
    try:
        report = cls(**kwargs).check()
    except (DataError, TypeError, ValueError) as exc:
        _fail(str(exc))
    out_console.print(format_check(report))
    if report.problems:
        sys.exit(1)


def entry() -> None:
    """The console script. After a clean finish it ends the process without the interpreter's
    module teardown, which takes 0.5-1 s once torch is loaded: every ``pflbench`` call and every
    worker process of a sweep would pay it. Exit handlers still run and output is flushed first;
    an uncaught exception ends the normal way, with its traceback."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    _hard_exit(int(code or 0))


def _hard_exit(code: int) -> None:
    import atexit
    import os
    import threading

    for thread in threading.enumerate():  # what interpreter shutdown would wait for
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError, ValueError):  # a closed pipe (`| head`) or stream
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
