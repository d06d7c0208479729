"""The `raycnn` command: list suites, run or search them under Ray Tune, print and compare tables, draw plots.

Every user error (`raycnn.errors.UserError`) ends in one line on stderr and its exit code (2 for
bad input). The reading commands (list, table, compare, report, plot) import neither torch nor
Ray, and each command imports only what it uses, so `raycnn --help` and `raycnn list` answer at
once; Ray and torch are imported by `run` and `search` only.
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from raycnn import screen, suites
from raycnn.errors import EXIT, OptionError, UserError

if TYPE_CHECKING:
    from raycnn.storage import Place

console = Console()
err_console = Console(stderr=True)
# The choices of --format, here so that `--help` needs neither pandas nor the page's code
# (tests check them against raycnn.tables.RENDERERS and raycnn.report.FORMATS).
TABLE_FORMATS = ("markdown", "csv", "json")
REPORT_FORMATS = ("html", "markdown")


# ---------------------------------------------------------------- list

def cmd_list(args) -> int:
    """`raycnn list [SUITE]`: the suites, or one suite's trials with the report's accuracy."""
    paths = suites.resolve(args.suite or "all")
    loaded = [suites.load(p) for p in paths]
    if args.suite is None:
        sheet = screen.Sheet(["suite", "trials", "description"], title="raycnn suites")
        sheet.rows = [[s.name, str(len(s.trials)), s.description] for s in loaded]
    else:
        sheet = screen.Sheet(["trial", "model", "optimizer", "lr", "epochs", "augment", "scheduler", "finetune",
                              "report"], title=args.suite, drop=LIST_DROP)
        sheet.rows = [_trial_cells(t) for s in loaded for t in s.trials]
    screen.emit(console, [sheet])
    # On a pipe stdout carries the table lines only; the count goes beside them.
    (console if console.is_terminal else err_console).print(
        f"{sum(len(s.trials) for s in loaded)} trials in {len(loaded)} suite(s)")
    return 0


# Least useful first: what goes when a terminal is too narrow for the whole trial list.
LIST_DROP = ("scheduler", "augment", "finetune", "epochs", "model", "lr", "optimizer")


def _trial_cells(t: suites.Trial) -> list[str]:
    c = t.config
    opt = c.optimizer + (f" m={c.momentum:g}" if c.momentum else "") + (f" wd={c.weight_decay:g}" if c.weight_decay else "")
    return [t.name, c.model, opt, f"{c.lr:g}", str(c.epochs), "+".join(c.augment) or "-", c.scheduler, c.finetune,
            "-" if math.isnan(t.report_acc) else f"{100 * t.report_acc:.0f}%"]


# ---------------------------------------------------------------- run

# `--quick`: every cell of the grid in minutes on a 2-core CPU (measured: see the README).
QUICK = {"epochs": 1, "max_train_samples": 5000}


def budget_of(args) -> str:
    """The training budget recorded in every row: the suite's own, --quick, or reduced by hand."""
    if args.quick:
        return "quick"
    return "reduced" if args.epochs or args.max_train_samples else "full"


def select(args) -> list[suites.Trial]:
    """The suite's trials after --filter and the command-line overrides."""
    trials = [t for p in suites.resolve(args.suite) for t in suites.load(p).trials]
    if args.filter:
        trials = [t for t in trials if any(fnmatch.fnmatch(t.name, f) for f in args.filter)]
        if not trials:
            raise OptionError(f"--filter {' '.join(args.filter)} matches no trial of {args.suite}")
    quick = QUICK if args.quick else {}
    overrides = {"epochs": args.epochs or quick.get("epochs"),
                 "max_train_samples": args.max_train_samples or quick.get("max_train_samples"),
                 "precision": args.precision, "seed": args.seed, "synthetic": True if args.synthetic else None,
                 "budget": budget_of(args), "checkpoint_every": args.checkpoint_every,
                 # absolute: the driver reads the data, but relative paths confuse anyone reading the rows
                 "data_dir": str(Path(args.data_dir or "data").expanduser().resolve())}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    out = []
    for t in trials:
        extra = {"weights": str(Path(args.weights).resolve())} if args.weights and t.config.pretrained else {}
        out.append(suites.with_overrides(t, **overrides, **extra))
    return out


def _imagenet_cached() -> bool:
    """Whether torchvision has the ImageNet resnet18 weights (cached, or downloadable now)."""
    import contextlib
    import io
    import torchvision
    try:   # quietly: a failed download attempt is not the user's news, the skip line is
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception:
        return False
    return True


def split_weights(trials: list[suites.Trial]) -> dict[str, str]:
    """The pretrained trials to skip for want of ImageNet weights (no --weights file and none
    in torchvision's cache), by name with the reason; refuses a run where nothing is left."""
    for t in trials:
        if t.config.weights and not Path(t.config.weights).is_file():
            raise OptionError(f"--weights {t.config.weights}: no such file")
    need = [t for t in trials if t.config.pretrained and not t.config.weights]
    if not need or _imagenet_cached():
        return {}
    if len(need) == len(trials):
        import torch
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise OptionError(f"ImageNet weights for resnet18 are not in {cache} and cannot be downloaded: "
                          f"pass --weights FILE (a resnet18 state dict)")
    return {t.name: suites.NEEDS_WEIGHTS for t in need}


def prepare_run_dir(args) -> tuple[Place, list[Place]]:
    """RESULTS_DIR/RUN (a local folder, or a URI such as s3://BUCKET/PATH), refusing to overwrite
    an existing run unless --resume, and one that cannot be written; also the folders this call
    created (innermost first), for `discard` to take back if the run cannot start."""
    from raycnn import storage
    if args.name in ("", ".", "..") or Path(args.name).name != args.name:
        raise OptionError(f"--name {args.name!r}: must be a plain folder name")
    run_dir = storage.resolve(args.results_dir) / args.name
    if run_dir.exists() and not args.resume:
        raise OptionError(f"run {run_dir} exists: pass --resume to continue it, or another --name")
    if args.resume and not any((run_dir / made).exists() for made in ("plan.json", "search.json")):
        raise OptionError(f"--resume: no run to resume at {run_dir}")
    local = run_dir.local
    # A bucket has no folders to make: a key prefix exists once an object is under it.
    created = [storage.Place(run_dir.fs, str(d)) for d in (local, *local.parents) if not d.exists()] if local \
        else [run_dir]
    try:
        if local:
            local.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"ok", durable=False)
        probe.unlink()
    except (OSError, UserError) as e:
        discard([d for d in created if d.exists()])
        detail = e.strerror if isinstance(e, OSError) and e.strerror else storage.first_line(e)
        raise OptionError(f"cannot write results to {run_dir}: {detail}") from None
    return run_dir, created


# What a run that never started may have left in its new folder: its lock, plan and Ray's log.
LEFT_BEFORE_START = ("driver.lock", "plan.json", "search.json", "ray.log")


def discard(created: list[Place]) -> None:
    """Remove the folders prepare_run_dir made, innermost first, where nothing but what a run
    leaves before it starts is in them (in a bucket: those objects; the prefix goes with them)."""
    if created:
        for name in LEFT_BEFORE_START:
            (created[0] / name).unlink()
    for d in created:
        try:
            if d.local:
                d.local.rmdir()
        except OSError:
            return


def resume_command(run_name: str) -> str:
    """The command line that resumes this run, quoted for a POSIX shell."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--name":
            skip = True
        elif a != "--resume" and not a.startswith("--name="):
            argv.append(a)
    return shlex.join(["raycnn", *argv, "--name", run_name, "--resume"])


# --log NAME[=URI]: the trackers raycnn.ray_trackers builds, and the package each one needs.
TRACKERS = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}
TAKES_URI = {"mlflow"}


def trackers(values: list[str]) -> tuple[tuple[str, str | None], ...]:
    """--log values as (name, URI or None), checked before Ray starts: a known tracker, a URI
    only where it takes one, its package installed."""
    import importlib.util
    out = []
    for value in values:
        name, _, uri = value.partition("=")
        if name not in TRACKERS:
            raise OptionError(f"--log {value}: unknown tracker; choose from {', '.join(TRACKERS)}")
        if "=" in value and name not in TAKES_URI:
            raise OptionError(f"--log {value}: only mlflow takes a tracking URI (--log mlflow=URI)")
        if "=" in value and not uri:
            raise OptionError(f"--log {value}: no tracking URI after '='")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise OptionError(f"--log {name} needs the {TRACKERS[name]} package: pip install 'raycnn[tracking]'")
        out.append((name, uri or None))
    return tuple(dict.fromkeys(out))


def cmd_run(args) -> int:
    """`raycnn run SUITE|FILE ...`: every selected trial as a Tune trial; Parquet into the run folder.

    Everything that can be checked without Ray is checked before Ray is imported. A run that
    cannot start leaves no folder behind; an interrupted one (Ctrl-C, SIGTERM) prints the
    command that resumes it and exits with EXIT["interrupted"]."""
    from raycnn import storage
    args.log = trackers(args.log or [])
    if ("mlflow", None) in args.log and storage.resolve(args.results_dir).local is None:
        raise OptionError(f"--log mlflow with --results-dir {args.results_dir}: give a tracking URI "
                          f"(--log mlflow=URI); the default store is an SQLite file, which needs a local run folder")
    trials = select(args)
    skipped = split_weights(trials)
    args.name = args.name or f"{Path(args.suite).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, created = prepare_run_dir(args)
    if skipped:
        say(f"{len(skipped)} pretrained trial(s) skipped: {suites.NEEDS_WEIGHTS}; the rest runs")
    raytune = None
    try:
        from raycnn import epoch_progress, tune as raytune     # Ray and torch are imported here only
        from raycnn.live import LiveView
        opts = raytune.RunOptions(run_dir=run_dir, address=args.address, cpus_per_trial=args.cpus_per_trial,
                                  gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                                  max_failures=args.max_failures, repeats=args.repeats, resume=args.resume,
                                  num_cpus=args.num_cpus, num_gpus=args.num_gpus, log=args.log)
        view = LiveView(err_console, header=f"raycnn: {len(trials) - len(skipped)} trial(s) x {args.repeats} into {run_dir}",
                        progress_dir=epoch_progress.folder(run_dir))
        outcome = raytune.run_trials(trials, opts, view=view, skipped=skipped)
    except KeyboardInterrupt:
        if raytune is None or not (run_dir / "tune").exists():   # before any trial: nothing to resume
            discard(created)
            raise
        outcome = "interrupted"
    except BaseException:
        discard(created)                         # e.g. Ray did not start: no half-made run left
        raise
    if (run_dir / "trials.parquet").exists():
        from raycnn import results
        show(results.read_rows(run_dir)[0])
    if outcome == "ok" and skipped:
        outcome = "skipped"
    messages = {"ok": f"done: results in {run_dir}",
                "errors": f"finished with failed trials (see the error column): results in {run_dir}",
                "interrupted": f"interrupted; resume with: {resume_command(args.name)}",
                "skipped": f"done except {len(skipped)} skipped trial(s) ({suites.NEEDS_WEIGHTS}): results in {run_dir}"}
    say(messages[outcome])
    return EXIT[outcome]


def say(line: str) -> None:
    """One unwrapped line on stderr: a resume command must survive copy and paste."""
    err_console.print(f"raycnn: {line}", markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- search

# --metric's choices, here so that `--help` needs no pandas (a test checks them against
# raycnn.search.METRICS). Never a test metric: a search must not select on the test set.
SEARCH_METRICS = ("val_acc", "val_loss")


def search_spaces(args, trials: list[suites.Trial]) -> dict:
    """Per suite of the matched cells, the space it is searched over: --space FILE's, else the
    suite file's [search] table; SuiteError naming the suite that declares none."""
    from raycnn import space
    if args.space:
        mine = space.load(args.space)
        return {t.suite: mine for t in trials}
    found = {s.name: s for p in suites.resolve(args.suite) for s in [suites.load(p)]}
    bare = sorted({t.suite for t in trials if found[t.suite].search is None})
    if bare:
        raise OptionError(f"suite {bare[0]} ({found[bare[0]].path}) declares no [search] table: "
                          f"pass --space FILE (see raycnn/space.py)")
    return {t.suite: found[t.suite].search for t in trials}


def search_plan(args, trials: list[suites.Trial]) -> dict:
    """The search's plan (raycnn.search), built and checked before Ray or torch is imported."""
    import importlib.util
    from raycnn import search
    searcher = "optuna" if importlib.util.find_spec("optuna") else "random"
    settings = {"metric": args.metric, "seed": args.seed or 0, "repeats": args.repeats, "samples": args.samples,
                "grace": args.grace, "val_fraction": args.val_fraction, "budget": args.budget}
    return search.plan_doc(trials, search_spaces(args, trials), settings, searcher)


def cmd_search(args) -> int:
    """`raycnn search CELL-GLOB ...`: each matched cell searched under ASHA on a validation
    split, its best config re-run with fresh seeds and scored on the test set.

    Checked like `raycnn run` before Ray is imported; an interrupted search prints the command
    that resumes it."""
    args.filter, args.quick, args.weights, args.log = args.cells, False, None, ()
    names = [t.name for p in suites.resolve(args.suite) for t in suites.load(p).trials]
    if not any(fnmatch.fnmatch(n, c) for n in names for c in args.cells):
        raise OptionError(f"CELL-GLOB {' '.join(args.cells)} matches no cell of {args.suite}")
    trials = select(args)
    if any(t.config.pretrained for t in trials):
        raise OptionError("the pretrained cells cannot be searched (no [search] space is declared for them)")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise OptionError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    search_plan(args, trials)                     # every mistake in the spaces, before Ray
    args.name = args.name or f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, created = prepare_run_dir(args)
    raytune = None
    try:
        from raycnn import epoch_progress, tune as raytune     # Ray and torch are imported here only
        from raycnn.live import LiveView
        opts = raytune.RunOptions(run_dir=run_dir, address=args.address, cpus_per_trial=args.cpus_per_trial,
                                  gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                                  max_failures=args.max_failures, resume=args.resume, num_cpus=args.num_cpus,
                                  num_gpus=args.num_gpus)
        doc = search_plan(args, raytune.apply_resources(trials, opts))
        view = LiveView(err_console, header=f"raycnn: search of {len(trials)} cell(s) into {run_dir}",
                        progress_dir=epoch_progress.folder(run_dir))
        outcome = raytune.run_search(doc, {t.name: t for t in trials}, opts, view=view)
    except KeyboardInterrupt:
        if raytune is None or not (run_dir / "tune").exists():
            discard(created)
            raise
        outcome = "interrupted"
    except BaseException:
        discard(created)
        raise
    messages = {"ok": f"done: samples in {run_dir}/samples.parquet, the re-run in {run_dir}/trials.parquet; "
                      f"raycnn table {run_dir}",
                "errors": f"finished with failed trials (see the error column): results in {run_dir}",
                "interrupted": f"interrupted; resume with: {resume_command(args.name)}"}
    say(messages[outcome])
    return EXIT[outcome]


# ---------------------------------------------------------------- table, plot

def load_runs(run_dirs: list[str]) -> list[dict]:
    """The trial rows of the given run folders, laid together by `tables.combine`'s rule."""
    from raycnn import results, storage, tables
    return tables.combine([(storage.resolve(d).name, results.read_rows(d)[0]) for d in run_dirs])


def show(trials, source: bool = False) -> None:
    """The report's tables on a terminal; on a pipe one tab-separated line per trial instead,
    since a grid's columns differ from table to table and grep/cut want one shape."""
    from raycnn import tables
    screen.emit(console, tables.sheets(trials, source) if console.is_terminal else [tables.long_sheet(trials)])


def cmd_table(args) -> int:
    """`raycnn table RUN [RUN ...]`: the runs' cells beside the report's, laid out as the report.
    A trial in several runs: the same config pools its repeats, another config takes the later run."""
    from raycnn import search
    searched = [d for d in args.run_dirs if search.is_search(d)]
    if searched:
        return _search_table(searched, [d for d in args.run_dirs if d not in searched], args.format)
    trials = load_runs(args.run_dirs)
    if args.format == "rich":
        show(trials, args.source)
    else:
        from raycnn import tables
        sys.stdout.write(tables.render(trials, args.format, args.source))
    return 0


def _search_table(searched: list[str], grid_runs: list[str], fmt: str) -> int:
    """`raycnn table SEARCH [RUN ...]`: per searched cell, report | grid (ours, from the RUNs) |
    tuned (the re-run) | best config | epochs spent."""
    from raycnn import search, tables
    view = tables.search_view([row for d in searched for row in search.summary(d)],
                              load_runs(grid_runs) if grid_runs else None)
    if fmt == "rich":
        screen.emit(console, [tables.search_sheet(view)])
    else:
        sys.stdout.write(tables.render_search(view, fmt))
    return 0


def cmd_compare(args) -> int:
    """`raycnn compare RUN_A RUN_B`: per trial in both, A, B and B - A."""
    from raycnn import storage, tables
    from raycnn.errors import ResultsError
    a, b = (load_runs([d]) for d in (args.run_a, args.run_b))
    diffs = tables.compare(a, b)
    if not diffs:
        raise ResultsError(f"{args.run_a} and {args.run_b} have no trial in common")
    if args.format == "rich":
        screen.emit(console, [tables.compare_sheet(diffs, storage.resolve(args.run_a).name,
                                                   storage.resolve(args.run_b).name)])
    else:
        sys.stdout.write(tables.compare_text(diffs, args.format))
    return 0


def cmd_plot(args) -> int:
    """`raycnn plot RUN_DIR`: the report's kind of figures, one PNG per table."""
    from raycnn import plots
    for path in plots.plot(args.run_dir, args.out):
        console.print(str(path))
    return 0


def cmd_report(args) -> int:
    """`raycnn report RUN [RUN ...] -o FILE`: the tables, figures, provenance and gaps as one page."""
    from raycnn import report
    console.print(str(report.write(args.run_dirs, args.output, args.format)))
    return 0


# ---------------------------------------------------------------- arguments

def _ray_run_options(p: argparse.ArgumentParser, unit: str, default_name: str) -> None:
    """The options `run` and `search` share: where, on what Ray, with what resources per `unit`."""
    p.add_argument("--data-dir", help="torchvision-layout data root (default: ./data)")
    # Not results/: that folder holds the published runs; runs/ is git-ignored.
    p.add_argument("--results-dir", default="runs",
                   help="where run folders go: a folder or a URI such as s3://BUCKET/PATH (default: runs/)")
    p.add_argument("--name", help=f"run folder name (default: {default_name})")
    p.add_argument("--resume", action="store_true", help="continue the run named by --name")
    p.add_argument("--address", help="join a Ray cluster (auto or HOST:PORT); default: a private local instance")
    p.add_argument("--gpus-per-trial", type=float, help=f"GPU share per {unit} (default: the suite's)")
    p.add_argument("--cpus-per-trial", type=int, help=f"CPUs per {unit} (default: the suite's)")
    p.add_argument("--max-concurrent", type=int, help=f"at most N {unit}s at once")
    p.add_argument("--max-failures", type=int, default=2, help=f"restarts of a failed {unit} from its checkpoint")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N epochs (default 1: a crash costs at "
                   "most the epoch in flight; larger N saves checkpoint time on big models)")
    p.add_argument("--num-cpus", type=int, help="local instance only: CPUs to give Ray")
    p.add_argument("--num-gpus", type=float, help="local instance only: GPUs to declare to Ray")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="raycnn", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    ls = sub.add_parser("list", help="suites, their trials and the report's accuracy")
    ls.add_argument("suite", nargs="?", help="a suite name, all, or a .toml file")
    ls.set_defaults(func=cmd_list)

    r = sub.add_parser("run", help="run a suite under Ray Tune")
    r.add_argument("suite", help="mnist | cifar10 | pretrained | all | a suite .toml file")
    r.add_argument("--filter", action="append", help="glob on trial names (repeatable), e.g. 'cifar10/base*'")
    r.add_argument("--quick", action="store_true",
                   help=f"every cell at a quick budget: {QUICK['epochs']} epoch on the first "
                        f"{QUICK['max_train_samples']:,} training images (rows say budget=quick)")
    r.add_argument("--epochs", type=int, help="override every trial's epochs")
    r.add_argument("--max-train-samples", type=int, help="train on the first N images")
    _ray_run_options(r, "trial", "SUITE-DATE-TIME")
    r.add_argument("--seed", type=int, help="base seed (repeat r uses seed + r)")
    r.add_argument("--repeats", type=int, default=1, help="run each trial N times with different seeds")
    r.add_argument("--synthetic", action="store_true", help="random data of the right shapes (smoke runs)")
    r.add_argument("--weights", help="ImageNet resnet18 state dict for the pretrained suite")
    r.add_argument("--log", action="append", metavar="TRACKER",
                   help="also log to tensorboard (event files in each trial's folder) or mlflow[=URI] "
                        "(default: a local store, RUN/mlflow.db); repeatable")
    r.set_defaults(func=cmd_run)

    se = sub.add_parser("search", help="search cells' settings under ASHA; re-run the best config with fresh seeds",
                        description="Each matched cell's network at its epochs and batch size, over its "
                                    "suite's [search] space (or --space FILE), selected on a validation split "
                                    "held out of the training set; the best config is re-run with fresh seeds "
                                    "on the whole training set and scored on the test set.")
    se.add_argument("cells", nargs="+", metavar="CELL-GLOB", help="glob on trial names, e.g. 'mnist/base/sgd/lr0.001'")
    se.add_argument("--suite", default="all", help="where the cells are: mnist | cifar10 | all | a suite .toml file")
    se.add_argument("--space", help="a TOML file with a [search] table, instead of the suite's")
    se.add_argument("--samples", type=int, help="configurations tried per cell (default: the space's)")
    se.add_argument("--budget", type=int, metavar="EPOCHS",
                    help="cap on the epochs the samples of a cell train in all (default: the space's budget_runs "
                         "times the cell's epochs)")
    se.add_argument("--grace", type=int, help="epochs every sample trains before ASHA may stop it (default: the space's)")
    se.add_argument("--metric", choices=SEARCH_METRICS, default="val_acc", help="what selects (never the test set)")
    se.add_argument("--val-fraction", type=float, help="share of the training set held out for selection "
                                                         "(default: the space's)")
    se.add_argument("--repeats", type=int, help="fresh seeds of the best config's re-run (default: the space's, 3)")
    se.add_argument("--seed", type=int, help="the samples' seed and the searcher's (default 0); the re-run "
                                             "takes the next seeds")
    se.add_argument("--epochs", type=int, help="override every cell's epochs (rows say budget=reduced)")
    se.add_argument("--max-train-samples", type=int, help="train on the first N images")
    se.add_argument("--synthetic", action="store_true", help="random data of the right shapes (smoke runs)")
    _ray_run_options(se, "sample", "search-DATE-TIME")
    se.set_defaults(func=cmd_search)

    t = sub.add_parser("table", help="print runs' results beside the report's",
                       description="Several runs: a trial with the same config in several runs pools its "
                                   "repeats (mean ± std; a seed in two runs counts once, from the later run); "
                                   "with a different config the later run (on the command line) wins. A search "
                                   "folder (raycnn search) among them: per searched cell, report | grid (ours, "
                                   "from the other runs) | tuned (the re-run) | best config | epochs spent.")
    t.add_argument("run_dirs", nargs="+", metavar="RUN", help="run folder(s), e.g. results/mnist-all-1ep")
    t.add_argument("--format", choices=["rich", *TABLE_FORMATS], default="rich",
                   help="rich: tables on a terminal, tab-separated lines on a pipe")
    t.add_argument("--source", action="store_true", help="show the run each cell came from")
    t.set_defaults(func=cmd_table)

    c = sub.add_parser("compare", help="two runs side by side: per trial A, B and B - A")
    c.add_argument("run_a", metavar="RUN_A")
    c.add_argument("run_b", metavar="RUN_B")
    c.add_argument("--format", choices=["rich", "csv", "json"], default="rich")
    c.set_defaults(func=cmd_compare)

    rp = sub.add_parser("report", help="one page: the tables, figures and provenance of runs (HTML or Markdown)",
                        description="Runs laid together as in `raycnn table`, with the report's figures, "
                                    "where each cell came from, and the cells not run with the reason.")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN", help="run folder(s), later runs win as in `raycnn table`")
    rp.add_argument("-o", "--output", default="report.html", help="file to write (default: report.html)")
    rp.add_argument("--format", choices=REPORT_FORMATS, default="html",
                    help="html: one self-contained file; markdown: FILE plus its PNGs in FILE_STEM_files/")
    rp.set_defaults(func=cmd_report)

    pl = sub.add_parser("plot", help="accuracy and loss curves per report table, as PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots)")
    pl.set_defaults(func=cmd_plot)
    return p


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line, as every other mistake is
    (argparse prints the whole usage first); `--help` still shows it all."""

    def error(self, message: str):
        print(f"raycnn: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT["usage"])


# Options that count things: (name, smallest value allowed).
COUNTS = {"epochs": 1, "repeats": 1, "max_concurrent": 1, "cpus_per_trial": 1, "max_train_samples": 1,
          "checkpoint_every": 1, "num_cpus": 1, "max_failures": 0, "seed": 0, "samples": 1, "budget": 1, "grace": 1}


def _check_numbers(args) -> None:
    for name, least in COUNTS.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise OptionError(f"--{name.replace('_', '-')} must be {'positive' if least else 'at least 0'}, got {value}")
    for name in ("gpus_per_trial", "num_gpus"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise OptionError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
    if getattr(args, "resume", False) and not args.name:
        raise OptionError("--resume needs --name RUN: the run to continue")


def error_line(e: BaseException) -> str:
    """An error as the one line the user gets (no wrapping, no traceback)."""
    return "raycnn: error: " + " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _check_numbers(args)
        return args.func(args)
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("raycnn: interrupted", file=sys.stderr)
        return EXIT["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
