"""`cerebro-tasks`: every pipeline step runnable by hand, the same functions the Airflow tasks call.

    cerebro-tasks synth   --out H5_ROOT --subjects N --days D --seed S [--windows-per-day K]
    cerebro-tasks convert --input H5_ROOT --output DATASET_URL [--fail-fast] [--timezone ZONE] [--label-map JSON]
    cerebro-tasks split   --dataset DATASET_URL --output PREPARED_URL --workers W [--seed S] [--val-fraction F]
    cerebro-tasks train   --config CONFIG.json            (MOP model selection; resumes a run id)
    cerebro-tasks export  --run RUN_URL --output EXPORT_URL [--top-k K]
    cerebro-tasks predict --dataset DATASET_URL --model EXPORT_FOLDER --predictions DIR --model-name NAME
                          [--padding drop|zero|wrap] [--no-segment] [--output-label] [--label-map JSON]

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


def cmd_split(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.split import write_split

    return write_split(args.dataset, args.output, workers=args.workers, seed=args.seed, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, spark=_spark(args, "cerebro-split"))


def cmd_train(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.workload import check_search
    from cerebro_tasks.jobs.train import load_config, train

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
    return train(config, _spark(args, f"cerebro-mop-{config.run_id}", workers=config.num_workers))


def cmd_export(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.export import export_best

    return export_best(args.run, args.output, top_k=args.top_k)


def cmd_predict(args: argparse.Namespace) -> Any:
    from cerebro_tasks.jobs.predict import predict

    return predict(_spark(args, "cerebro-predict"), dataset_url=args.dataset, model_url=args.model,
                   predictions_url=args.predictions, model_name=args.model_name, subjects=args.subjects,
                   only_new=args.which == "new", padding=args.padding, include_label=args.include_label,
                   include_segment=args.segment, label_map=args.label_map or None)


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
    p.add_argument("--which", choices=["all", "new"], default="all",
                   help="new: skip subjects an earlier run already predicted (<predictions>/_predicted_subjects.json)")
    p.add_argument("--padding", default="drop", choices=["drop", "zero", "wrap"],
                   help="a segment's tail shorter than the model's window: drop it, pad with zero windows, or wrap")
    p.add_argument("--output-label", "--include-label", dest="include_label", action=argparse.BooleanOptionalAction,
                   default=False, help="add the label column (segment,timestamp,label,prediction)")
    p.add_argument("--segment", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-segment leaves the segment column out")
    p.add_argument("--label-map", default=None,
                   help="class name -> index as JSON, naming the CSV's classes (default: the dataset's label map)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cerebro_tasks.deeppostures.convert import ConversionError
    from cerebro_tasks.mop.runtime import MopError
    from cerebro_tasks.storage.store import LockedError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = args.fn(args)
        _print(result)
        if args.result_file:
            from cerebro_tasks.storage.store import Store

            folder, name = os.path.split(args.result_file.rstrip("/"))
            Store(folder or ".").write_json(result, name)
    except (ValueError, OSError, LockedError, ConversionError, MopError) as e:
        if args.verbose:  # -v: the whole story, for a bug report
            raise
        # bad input, a missing file, a busy dataset, a cluster without enough slots: one clear line
        print(f"cerebro-tasks {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
