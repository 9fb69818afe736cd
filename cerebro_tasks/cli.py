"""`cerebro-tasks`: every pipeline step runnable by hand, the same functions the Airflow tasks call.

    cerebro-tasks synth   --out H5_ROOT --subjects N --days D --seed S [--windows-per-day K]
    cerebro-tasks convert --input H5_ROOT --output DATASET_URL [--fail-fast] [--timezone ZONE] [--label-map JSON]
    cerebro-tasks split   --dataset DATASET_URL --output PREPARED_URL --workers W [--seed S] [--val-fraction F]
                          [--as-of ISO]   (the dataset as it was then: files that had arrived before it)
    cerebro-tasks train   --config CONFIG.json            (MOP model selection; resumes a run id)
    cerebro-tasks export  --run RUN_URL --output EXPORT_URL [--top-k K]
    cerebro-tasks predict --dataset DATASET_URL --model EXPORT_FOLDER --predictions DIR --model-name NAME
                          [--padding drop|zero|wrap] [--no-segment] [--output-label] [--label-map JSON]
                          [--which all|new|arrived] [--as-of ISO] [--since ISO]

Each prints a JSON summary on stdout. Spark steps use `--master` (default: $SPARK_MASTER, else
local[2]; local[W,3] for train); in a deployment the Airflow operators submit the same code with
spark-submit, whose master wins.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable


def _print(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _spark(args: argparse.Namespace, app: str, workers: int | None = None) -> Any:
    """The session: spark-submit's master when submitted, else --master, else local mode.

    MOP's barrier stage needs a task slot per worker at once, hence local[W] for training; the
    second number lets Spark retry a failed task, which is how a killed worker comes back.
    """
    from cerebro_tasks.spark_session import get_spark

    master = args.master
    if master is None and workers and "PYSPARK_GATEWAY_PORT" not in os.environ:
        master = f"local[{workers},3]"
    return get_spark(app_name=app, master=master)


def cmd_synth(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.synth import run_cli

    paths = run_cli(args)
    return {"h5_root": args.out, "files": len(paths)}


def cmd_convert(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.convert import convert

    return convert(args.input, args.output, spark=_spark(args, "cerebro-convert"), fail_fast=args.fail_fast,
                   timezone=args.timezone or None, label_map=args.label_map or None)


def _instant_ns(text: str | None) -> int | None:
    from cerebro_tasks.deeppostures.arrivals import to_ns

    if text in (None, ""):
        return None
    try:
        return to_ns(text)
    except ValueError:
        raise ValueError(f"expected an ISO-8601 instant such as 2024-03-02T00:00:00+00:00, got {text!r}") from None


def answer_without_spark(args: argparse.Namespace) -> Any | None:
    """A step's result when it can be known without starting Spark, else None.

    `convert` with nothing new answers from the manifest and a listing (an hourly ingest mostly
    finds nothing); the Airflow operators ask the same before spark-submit.
    """
    if args.command == "convert" and not args.fail_fast:
        from cerebro_tasks.deeppostures.nothing_new import unchanged_report

        return unchanged_report(args.input, args.output, timezone=args.timezone or None,
                                label_map=args.label_map or None)
    return None


def cmd_split(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.split import write_split

    return write_split(args.dataset, args.output, workers=args.workers, seed=args.seed, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, spark=_spark(args, "cerebro-split"),
                       as_of_ns=_instant_ns(args.as_of))


def cmd_train(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.workload import check_search
    from cerebro_tasks.jobs.train import check_split, load_config, train

    config = load_config(args.config)
    if args.early_stopping is not None or args.select is not None:  # the file's search, with these settings
        import dataclasses
        import json

        from cerebro_tasks.config import TrainConfig

        d = dataclasses.asdict(config)
        if args.early_stopping is not None:
            d["search"]["early_stopping"] = None if args.early_stopping == "none" else json.loads(args.early_stopping)
        if args.select is not None:
            d["search"]["select"] = args.select
        config = TrainConfig.from_dict(d)
    check_search(config.search.space, config.search.metric)  # before paying for a Spark session
    check_split(config.prepared_url, config.num_workers)
    return train(config, _spark(args, f"cerebro-mop-{config.run_id}", workers=config.num_workers))


def cmd_export(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.export import export_best

    return export_best(args.run, args.output, top_k=args.top_k)


def cmd_predict(args: argparse.Namespace) -> Any:
    from cerebro_tasks.jobs.predict import check_inputs, predict

    check_inputs(args.model, args.model_name)  # before paying for a Spark session
    as_of, since = _instant_ns(args.as_of), _instant_ns(args.since)
    if (args.which == "arrived") != (since is not None) or (since is not None and as_of is None):
        raise ValueError("--which arrived goes with --since and --as-of (the interval the subjects arrived in)")
    return predict(_spark(args, "cerebro-predict"), dataset_url=args.dataset, model_url=args.model,
                   predictions_url=args.predictions, model_name=args.model_name, subjects=args.subjects,
                   only_new=args.which == "new", padding=args.padding, include_label=args.include_label,
                   include_segment=args.segment, label_map=args.label_map or None,
                   as_of_ns=as_of, arrived_since_ns=since)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cerebro-tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--result-file", default=None,
                        help="also write the JSON summary here, atomically (how the Airflow operators read it back)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], Any]] = {}

    def add(name: str, fn: Callable[[argparse.Namespace], Any], help_text: str, spark: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if spark:
            p.add_argument("--master", default=None, help="Spark master (default $SPARK_MASTER or local[2]; local[W,3] for train)")
        p.set_defaults(fn=fn)
        commands[name] = fn
        return p

    from cerebro_tasks.deeppostures.synth import add_cli_arguments

    add_cli_arguments(add("synth", cmd_synth, "generate realistic DeepPostures H5 files", spark=False))

    p = add("convert", cmd_convert, "validate H5 files and convert them (incrementally) to a Petastorm dataset")
    p.add_argument("--input", required=True, help="H5 root: <root>/<subject>/<YYYY-MM-DD>.h5")
    p.add_argument("--output", required=True, help="dataset URL (path, file://, hdfs://)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first invalid file instead of quarantining it")
    p.add_argument("--timezone", default=None,
                   help="IANA zone of the machine that pre-processed the study, e.g. America/Los_Angeles "
                        "(default: the dataset's recorded zone, else UTC)")
    p.add_argument("--label-map", default=None,
                   help='class name -> index as JSON, e.g. \'{"sitting": 0, "standing": 1, "stepping": 2}\' '
                        "(default: the dataset's recorded map, else sitting 0 / not-sitting 1)")

    p = add("split", cmd_split, "split subjects into train/validation and balanced worker partitions")
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True, help="prepared split URL")
    p.add_argument("--workers", type=int, required=True, help="number of MOP workers (partitions per split)")
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--as-of", default=None, help="ISO instant: split the dataset as it was then (files arrived before it)")

    p = add("train", cmd_train, "model selection with MOP (resumes a run with the same run id)")
    p.add_argument("--config", required=True, help="run configuration: JSON text or a path to a JSON file")
    p.add_argument("--early-stopping", default=None, metavar="JSON",
                   help='overrides search.early_stopping, e.g. \'{"kind": "asha", "reduction_factor": 3}\' or none')
    p.add_argument("--select", default=None, choices=["last_epoch", "best_epoch"],
                   help="overrides search.select: the checkpoint exported is the last or the best epoch's")

    p = add("export", cmd_export, "export a run's best model (.keras, SavedModel, metadata)", spark=False)
    p.add_argument("--run", required=True, help="run URL: <store>/runs/<run_id>")
    p.add_argument("--output", required=True, help="export root; the model goes to <root>/<run_id>/")
    p.add_argument("--top-k", type=int, default=1,
                   help="also export the k best models (k odd) for a CHAP-style majority vote per window")

    p = add("predict", cmd_predict, "write CHAP-format predictions per subject")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="an export folder (holding model.keras)")
    p.add_argument("--predictions", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--subjects", nargs="*", default=None, help="only these subjects (default: every subject)")
    p.add_argument("--which", choices=["all", "new", "arrived"], default="all",
                   help="new: skip subjects an earlier run already predicted (<predictions>/_predicted_subjects.json); "
                        "arrived: the subjects with a file arriving in [--since, --as-of)")
    p.add_argument("--as-of", default=None, help="ISO instant: the dataset as it was then (files arrived before it)")
    p.add_argument("--since", default=None, help="ISO instant: start of the arrival interval (--which arrived)")
    p.add_argument("--padding", default="drop", choices=["drop", "zero", "wrap"],
                   help="a segment's tail shorter than the model's window: drop it, pad with zero windows, or wrap")
    p.add_argument("--output-label", "--include-label", dest="include_label", action=argparse.BooleanOptionalAction,
                   default=False, help="add the label column (segment,timestamp,label,prediction)")
    p.add_argument("--segment", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-segment leaves the segment column out")
    p.add_argument("--label-map", default=None,
                   help="class name -> index as JSON, naming the CSV's classes (default: the dataset's label map)")
    return parser


def step_errors() -> tuple[type[BaseException], ...]:
    """What a step raises for bad input, a missing file, a busy dataset or a cluster without
    enough slots: reported as one clear line, not a traceback."""
    from cerebro_tasks.deeppostures.convert import ConversionError
    from cerebro_tasks.mop.runtime import MopError
    from cerebro_tasks.storage.store import LockedError

    return ValueError, OSError, LockedError, ConversionError, MopError


def describe_error(command: str, error: BaseException) -> dict[str, Any]:
    """A step's failure as the operator reads it back: the one-line message and whether a retry may help."""
    return {"error": f"cerebro-tasks {command}: error: {error}", "retryable": retryable(error)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = answer_without_spark(args)
        if result is None:
            result = args.fn(args)
        _print(result)
        if args.result_file:
            from cerebro_tasks.storage.store import Store

            folder, name = os.path.split(args.result_file.rstrip("/"))
            Store(folder or ".").write_json(result, name)
    except step_errors() as e:
        if args.verbose:  # -v: the whole story, for a bug report
            raise
        failure = describe_error(args.command, e)
        print(failure["error"], file=sys.stderr)
        if args.result_file:
            from cerebro_tasks.storage.store import Store

            folder, name = os.path.split(error_file(args.result_file))
            Store(folder or ".").write_json(failure, name)
        return 2
    return 0


def error_file(result_file: str) -> str:
    """Where a failed step leaves its one-line error for the Airflow operator (beside the result)."""
    return result_file.rstrip("/") + ".error"


def retryable(error: BaseException) -> bool:
    """Whether running the step again could succeed: a busy dataset, a cluster that lost workers,
    a failed Spark job or an I/O hiccup may pass; bad input or configuration never will."""
    from cerebro_tasks.deeppostures.convert import ConversionError
    from cerebro_tasks.mop.runtime import MopError
    from cerebro_tasks.storage.store import LockedError

    if isinstance(error, (LockedError, MopError, ConversionError)):
        return True
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(error, OSError)


if __name__ == "__main__":
    sys.exit(main())
