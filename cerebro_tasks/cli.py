"""`cerebro-tasks`: every pipeline step runnable by hand, the same functions the Airflow tasks call.

    cerebro-tasks synth   --out H5_ROOT --subjects N --days D --seed S [--windows-per-day K]
    cerebro-tasks convert --input H5_ROOT --output DATASET_URL [--fail-fast]
    cerebro-tasks split   --dataset DATASET_URL --output PREPARED_URL --workers W [--seed S] [--val-fraction F]
    cerebro-tasks train   --config CONFIG.json            (MOP model selection; resumes a run id)
    cerebro-tasks export  --run RUN_URL --output EXPORT_URL
    cerebro-tasks predict --dataset DATASET_URL --model EXPORT_FOLDER --predictions DIR --model-name NAME

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

    return convert(args.input, args.output, spark=_spark(args, "cerebro-convert"), fail_fast=args.fail_fast)


def cmd_split(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.split import write_split

    return write_split(args.dataset, args.output, workers=args.workers, seed=args.seed, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, spark=_spark(args, "cerebro-split"))


def cmd_train(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.workload import check_search
    from cerebro_tasks.jobs.train import check_split, load_config, train

    config = load_config(args.config)
    check_search(config.search.space, config.search.metric)  # before paying for a Spark session
    check_split(config.prepared_url, config.num_workers)
    return train(config, _spark(args, f"cerebro-mop-{config.run_id}", workers=config.num_workers))


def cmd_export(args: argparse.Namespace) -> Any:
    from cerebro_tasks.deeppostures.export import export_best

    return export_best(args.run, args.output)


def cmd_predict(args: argparse.Namespace) -> Any:
    from cerebro_tasks.jobs.predict import check_inputs, predict

    check_inputs(args.model, args.model_name)  # before paying for a Spark session
    return predict(_spark(args, "cerebro-predict"), dataset_url=args.dataset, model_url=args.model,
                   predictions_url=args.predictions, model_name=args.model_name, subjects=args.subjects,
                   only_new=args.which == "new", padding=args.padding, include_label=args.include_label)


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

    p = add("split", cmd_split, "split subjects into train/validation and balanced worker partitions")
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True, help="prepared split URL")
    p.add_argument("--workers", type=int, required=True, help="number of MOP workers (partitions per split)")
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--test-fraction", type=float, default=0.0)

    p = add("train", cmd_train, "model selection with MOP (resumes a run with the same run id)")
    p.add_argument("--config", required=True, help="run configuration: JSON text or a path to a JSON file")

    p = add("export", cmd_export, "export a run's best model (.keras, SavedModel, metadata)", spark=False)
    p.add_argument("--run", required=True, help="run URL: <store>/runs/<run_id>")
    p.add_argument("--output", required=True, help="export root; the model goes to <root>/<run_id>/")

    p = add("predict", cmd_predict, "write CHAP-format predictions per subject")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="an export folder (holding model.keras)")
    p.add_argument("--predictions", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--subjects", nargs="*", default=None, help="only these subjects (default: every subject)")
    p.add_argument("--which", choices=["all", "new"], default="all",
                   help="new: skip subjects an earlier run already predicted (<predictions>/_predicted_subjects.json)")
    p.add_argument("--padding", default="drop", choices=["drop", "zero", "wrap"])
    p.add_argument("--include-label", action="store_true")
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
