"""``tools/elastic_study.py``: ``run`` trains and evaluates what is missing, then rebuilds the
report; ``report`` rebuilds ``report.md``, ``results.json`` and the plots from the stored results
alone (e.g. after committing each finished arm's file from several sittings)."""

from __future__ import annotations

import argparse
import sys
import time

from megatron_elastic.study.spec import PROTOCOLS, StudyError, load_study


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/elastic_study.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "train and evaluate every missing run, then write the report"),
                       ("report", "rebuild the report from the stored results")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--spec", required=True, help="study spec YAML, e.g. configs/study/cpu.yaml")
        p.add_argument("--work-dir", default=None, help="override the spec's work_dir")
        p.add_argument("--results-dir", default=None, help="override the spec's results_dir")
        if name == "run":
            p.add_argument("--jobs", type=int, default=1,
                           help="runs at a time; each gets cpu_count/jobs threads (default 1)")
            p.add_argument("--stage", choices=("all", "train"), default="all",
                           help="train = train every run, evaluate none (default all)")
            p.add_argument("--protocol", action="append", choices=PROTOCOLS, default=None,
                           help="only these protocols (repeatable; default all in the spec)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.spec, args.work_dir, args.results_dir)
        if args.command == "run":
            from megatron_elastic.study.runner import run_study

            if args.jobs < 1:
                raise StudyError(f"--jobs {args.jobs} must be >= 1")
            t0 = time.time()
            failed = run_study(study, jobs=args.jobs, stage=args.stage, protocols=args.protocol,
                               say=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True))
            print(f"study run took {time.time() - t0:.0f} s", flush=True)
            if failed:
                print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
            if args.stage == "train":
                return 1 if failed else 0
        from megatron_elastic.study.report import write_report

        paths = write_report(study)
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)
        return 1 if args.command == "run" and failed else 0
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
