"""The ``nas`` command. Each subcommand is a thin shell over one module.

Bad input of any kind ends as one line, ``error: <file>: <field>: <why>``, and exit code 2.

The terminal shows the stages, their progress bars, a line per trial and the results; warnings
go there too. Everything libraries log (exporters, Ray, Optuna, feature caches) and every Python
warning goes to ``nas.log`` in the study's (or the run's) directory instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from nas.errors import UserError


def _schedule_names() -> str:
    from nas.schedule import SCHEDULES

    return ", ".join(sorted(p.stem for p in SCHEDULES.glob("*.yaml")))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: "--gpus" must not quietly mean "--gpus-per-trial" (or a future option).
        super().__init__(*args, **kwargs, allow_abbrev=False)

    def error(self, message: str):  # argparse's default prints the usage block too
        raise UserError("cli", self.prog.removeprefix("nas").strip() or "nas", message)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    _console_logging()
    # SIGTERM (kill, a batch scheduler's end of job) stops a command as Ctrl-C does: the study and
    # the checkpoints are left to resume, and Ray's local processes are shut down on the way out.
    # A command started in the background ignores SIGINT, as background jobs do; SIGTERM stops it.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            parser.print_help()
            return 2
        return args.run(args) or 0
    except UserError as exc:
        print(exc.line(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _LogFile(logging.FileHandler):
    """``DIR/nas.log``, created at the first record: a command refused before it logs anything
    leaves no file (and no directory) behind."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        super().__init__(self.directory / "nas.log", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.directory.mkdir(parents=True, exist_ok=True)
        super().emit(record)


def _console_logging() -> None:
    """Warnings from `nas` on the terminal; library chatter only in the log file (:func:`_log_file`)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "nas", False)]:  # main() called again in-process
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.addFilter(lambda record: record.name == "nas" or record.name.startswith("nas."))
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console.nas = True
    root.addHandler(console)
    logging.captureWarnings(True)  # Python warnings (deprecations, experimental APIs) become log records
    import optuna  # Optuna logs to stderr through a handler of its own: send its records to ours instead

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def _log_file(directory: Path) -> None:
    """Also log everything (INFO and up, any library) to ``directory/nas.log``."""
    handler = _LogFile(directory)
    handler.nas = True
    logging.getLogger().addHandler(handler)


def _build_parser() -> argparse.ArgumentParser:
    from nas.study import DEFAULT_FIDELITY, DEFAULT_OBJECTIVES, SIGNALS, default_objectives
    from nas.schedule import Rungs

    p = _Parser(prog="nas", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(parser_class=_Parser)

    c = sub.add_parser("count", help="exact parameters, bytes and MACs of designs")
    c.add_argument("designs", nargs="+", type=Path, help="ArchConfig JSON files")
    c.add_argument("--budget", help="mark which designs fit, e.g. 1M or 4MB@int8")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(run=_count)

    b = sub.add_parser("bench", help="benchmarks that print figures (ratios against a reference)")
    b.add_argument("which", nargs="?", default="all", choices=["all", "budget", "train", "optim", "search", "learn", "levers", "fidelity", "deploy", "decode"])
    b.add_argument("--out", type=Path, default=Path("results"), help="where bench.json and bench.md go")
    b.add_argument("--trials", type=int, default=12, help="search: trials per study (default 12)")
    b.add_argument("--seeds", type=int, default=3, help="search: seeds per sampler (default 3)")
    b.add_argument("--space", default="paper.yaml", help="search: a file of search_spaces/ (default paper.yaml)")
    b.add_argument("--budget", default="1M", help="search: the budget (default 1M)")
    b.add_argument("--proxy", default="proxy", help="search, fidelity: the proxy schedule (default proxy)")
    b.add_argument("--data", default="synth", help="search, fidelity: the corpus (default synth)")
    b.add_argument("--objective", default=DEFAULT_OBJECTIVES[0],
                   help=f"search: the proxy signal (default {DEFAULT_OBJECTIVES[0]})")
    b.add_argument("--fidelity-minutes", type=float, default=0,
                   help="search: also compare --fidelity fixed and asha, this many minutes each (default: skip)")
    b.add_argument("--rungs", help="search: the rungs of every search under --fidelity asha, as for nas search "
                                   f"(default {','.join(map(str, Rungs().multiples))})")
    b.add_argument("--eta", type=_positive, help=f"search: the eta of those searches, as for nas search (default {Rungs().eta})")
    b.add_argument("--reference", default="full", help="search: the schedule that retrains each mode's best design; "
                   "fidelity: the schedule the proxies are ranked against (default full)")
    b.add_argument("--jobs", type=_positive, default=1,
                   help="fidelity: runs trained at once, each in its own process with the cores shared out "
                        "(on a GPU machine they share the GPU; default 1)")
    b.add_argument("--no-train", action="store_true",
                   help="fidelity: train nothing, rank the designs whose runs are all done (where a benchmark "
                        "run over several sittings stands)")
    b.add_argument("--runs", type=Path, nargs="+",
                   help="deploy: trainer run directories to export; decode: to decode (default results/full-1m and "
                        "results/full-1m-*)")
    b.add_argument("--designs", default="unshared,paper",
                   help="learn: which 1M baselines to train, comma-separated (default unshared,paper); each "
                        "resumes from results/bench-learn/, so the benchmark can be run one design per sitting")
    b.set_defaults(run=_bench)

    data = sub.add_parser("data", help="prepare a corpus").add_subparsers(parser_class=_Parser)
    ds = data.add_parser("synth", help="synthesize the embedded corpus with espeak-ng")
    ds.add_argument("--hours", type=float, default=None, help="training audio (default 10)")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--out", type=Path, help="default: $NAS_CACHE/synth-<hours>h-seed<seed>")
    ds.set_defaults(run=_data_synth)
    dl = data.add_parser("librispeech", help="LibriSpeech's own layout into manifests")
    dl.add_argument("root", type=Path)
    dl.add_argument("--out", type=Path, required=True, help="where <subset>.jsonl go")
    dl.set_defaults(run=_data_librispeech)

    schedules = _schedule_names()
    t = sub.add_parser("train", help="train and evaluate one design (the trainer)")
    t.add_argument("arch", type=Path, help="ArchConfig JSON (an export's arch.json works too)")
    t.add_argument("--schedule", default="proxy",
                   help=f"a named schedule ({schedules}) or a YAML file (default proxy)")
    t.add_argument("--data", help="synth[:HOURS], librispeech:PATH or manifest:DIR (default: the schedule's "
                                  "data, else synth; full trains on synth:30)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    t.add_argument("--seed", type=int, default=None,
                   help="overrides the schedule's seed (initialization, batch order, SpecAugment): a repeat of a run")
    t.set_defaults(run=_train)

    se = sub.add_parser("search", help="search a space under a hard memory budget")
    se.add_argument("space", type=Path, help="search-space YAML")
    se.add_argument("--budget", help="overrides the space's budget: 1M parameters, or 4MB@int8")
    se.add_argument("--trials", type=_positive, default=24, help="designs to train (infeasible samples don't count)")
    se.add_argument("--workers", type=_positive, default=2, help="trials at once")
    se.add_argument("--cpus-per-trial", type=_positive, default=1)
    se.add_argument("--gpus-per-trial", type=_fraction, default=0, help="GPUs each trial asks Ray for (default 0)")
    se.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "gp", "random"])
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--study", help="study name (default: the space's name)")
    se.add_argument("--storage", help="Optuna storage URL (default: SQLite in results/<study>/study.db)")
    se.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    se.add_argument("--data", default="synth", help="synth[:HOURS], librispeech:PATH or manifest:DIR")
    se.add_argument("--proxy", default="proxy", help="the proxy schedule: a name or a YAML file")
    se.add_argument("--objectives",
                    help=f"a proxy signal ({', '.join(SIGNALS)}), bytes, optionally macs, rtf, memory (default: what "
                         "the study was started with; for a new study the signal nas bench fidelity ranked best "
                         "for the fidelity, and bytes: "
                         + "; ".join(f"{','.join(default_objectives(f))} under {f}" for f in ("asha", "fixed")) + ")")
    se.add_argument("--fidelity", default=DEFAULT_FIDELITY, choices=["fixed", "asha"],
                    help="asha: successive halving over rungs; fixed: every design trains the proxy "
                         f"(default {DEFAULT_FIDELITY}: more designs in the same time, measured by nas bench search)")
    se.add_argument("--rungs", help="asha: rungs as increasing multiples of the proxy's steps (default: what the "
                                    f"study was started with; for a new study {','.join(map(str, Rungs().multiples))})")
    se.add_argument("--eta", type=_positive, help="asha: the first 1/eta of a rung in MOASHA order goes on "
                                                  f"(default: as --rungs; {Rungs().eta})")
    se.add_argument("--enqueue", type=Path, action="append", default=[], help="ArchConfig JSON to add (repeatable)")
    se.add_argument("--no-baselines", action="store_true", help="don't add the built-in baselines")
    se.add_argument("--max-trial-memory", type=_megabytes, metavar="SIZE",
                    help="memory guard: a trial whose process holds more (e.g. 6GB, 800MB) stops as FAILED")
    se.add_argument("--results", type=Path, default=Path("results"), help="where results/<study>/ goes")
    se.set_defaults(run=_search)

    rt = sub.add_parser("retrain", help="retrain the best designs of a study with the full schedule")
    rt.add_argument("study")
    rt.add_argument("--top", type=_positive, default=3, help="designs spread along the front (baselines are added)")
    rt.add_argument("--schedule", default="full",
                    help=f"a named schedule ({schedules}) or a YAML file (default full)")
    rt.add_argument("--workers", type=_positive, default=2)
    rt.add_argument("--cpus-per-trial", type=_positive, default=1)
    rt.add_argument("--gpus-per-trial", type=_fraction, default=0, help="GPUs each trial asks Ray for (default 0)")
    rt.add_argument("--seeds", type=_positive, default=1,
                    help="train the best searched design and the baselines with this many seeds (default 1)")
    _study_options(rt)
    rt.set_defaults(run=_retrain)

    rp = sub.add_parser("report", help="write results/<study>/report.md and report.html")
    rp.add_argument("study")
    _study_options(rp)
    rp.set_defaults(run=_report)

    ex = sub.add_parser("export", help="write a chosen design as arch.json, weights, ONNX and a model card")
    ex.add_argument("study")
    pick = ex.add_mutually_exclusive_group(required=True)
    pick.add_argument("--design", type=int, help="a trial number on the front (or retrained)")
    pick.add_argument("--best-under", help="the best retrained design within this budget, e.g. 1M or 1MB@int8")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--force", action="store_true", help="overwrite an export directory that holds files")
    ex.add_argument("--dtype", choices=["fp32", "bf16", "int8"], help="model.onnx's dtype (default: the budget's)")
    ex.add_argument("--activations", choices=["static", "float"], default="static",
                    help="int8: static calibrated activations, as a device runs them (default), or float")
    ex.add_argument("--data", help="the corpus to calibrate on and measure with (default: the study's)")
    ex.add_argument("--test-utterances", type=_positive, help="measure on the first N test utterances (default all)")
    ex.add_argument("--no-measure", action="store_true", help="don't measure WER, speed and memory")
    _study_options(ex)
    ex.set_defaults(run=_export)

    tr = sub.add_parser("transcribe", help="transcribe audio files with an export (onnxruntime, no torch)")
    tr.add_argument("export_dir", type=Path)
    tr.add_argument("audio", type=Path, nargs="+")
    tr.add_argument("--greedy", action="store_true", help="greedy decoding even when the export has an LM")
    tr.add_argument("--threads", type=_positive, help="onnxruntime threads (default: all cores)")
    tr.set_defaults(run=_transcribe)

    d = sub.add_parser("demo", help="the main job: corpus, search, retrain, report, export")
    d.add_argument("--scale", default="demo", choices=["demo", "ci", "paper-1m"],
                   help="ci: the same pipeline, tiny; paper-1m: the reference study (hours)")
    d.add_argument("--results", type=Path, default=Path("results"))
    d.add_argument("--study", default=None, help="default: the scale's name")
    d.add_argument("--workers", type=_positive, default=2, help="trials and retrains at once (default 2)")
    d.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    d.set_defaults(run=_demo)
    return p


def _count(args) -> int:
    from nas.budget import budget_table, count, parse_budget
    from nas.config import ArchConfig

    budget = parse_budget(args.budget) if args.budget else None
    rows = [(path.stem, count(ArchConfig.load(path))) for path in args.designs]
    if args.json:
        out = {name: c.as_dict() | ({"fits": budget.fits(c)} if budget else {}) for name, c in rows}
        print(json.dumps(out, indent=2))
    else:
        print(budget_table(rows, budget))
    return 0


def _data_synth(args) -> int:
    from nas.data import synth

    hours = synth.DEFAULT_HOURS if args.hours is None else args.hours
    out = args.out or synth.default_dir(hours, args.seed)
    synth.build(out, hours=hours, seed=args.seed)
    print(f"synth corpus in {out}: train.jsonl, dev.jsonl, test.jsonl")
    return 0


def _data_librispeech(args) -> int:
    from nas.data.librispeech import to_manifests

    for subset, path in to_manifests(args.root, args.out).items():
        print(f"{subset}: {path}")
    return 0


def _train(args) -> int:
    from nas.config import ArchConfig
    from nas.data.corpus import resolve_data
    from nas.data.features import skipped_text
    from nas.schedule import load_schedule
    from nas.train import train

    arch = ArchConfig.load(args.arch)
    schedule = load_schedule(args.schedule)
    if args.seed is not None:
        schedule = schedule.model_copy(update={"seed": args.seed})
    _log_file(args.out)
    spec = args.data or schedule.data or "synth"
    if not args.data and schedule.data:  # a corpus the command line did not name: say which
        print(f"corpus {spec}: the {schedule.name} schedule's data (--data for another)", flush=True)
    corpus = resolve_data(spec)
    metrics = train(arch, schedule, corpus, args.out, threads=args.threads)
    for split, skipped in metrics["skipped"].items():
        if skipped:
            print(f"{split}: {skipped_text(skipped).removeprefix(', ')}: audio that would not decode")
    line = f"dev WER {metrics['dev']['wer']:.3f}"
    if "test" in metrics:
        line += f", test WER {metrics['test']['wer']:.3f} (CER {metrics['test']['cer']:.3f})"
    print(f"{line}; {metrics['steps']} steps in {metrics['train_seconds']:.0f} s; {args.out}/metrics.json")
    return 0


def _search(args) -> int:
    from nas.budget import parse_budget
    from nas.search import SearchSettings, run_search
    from nas.space import load_space
    from nas.study import DEVICE_OBJECTIVES, parse_objectives
    from nas.schedule import load_schedule

    space = load_space(args.space)
    budget = parse_budget(args.budget) if args.budget else space.budget
    if budget is None:
        raise UserError(str(args.space), "budget", "no budget in the space file; give --budget")
    objectives = parse_objectives(args.objectives) if args.objectives else None  # None: see SearchSettings
    rungs = _rungs(args.rungs, args.eta)
    if args.fidelity == "asha" and set(objectives or ()) & set(DEVICE_OBJECTIVES):
        raise UserError("--objectives", "", "rtf and memory are measured when a design's training ends, which a "
                        "design stopped at a rung never reaches: use them with --fidelity fixed")
    load_schedule(args.proxy)  # a bad schedule is refused before anything starts
    _log_file(args.results / (args.study or space.name))
    run_search(SearchSettings(
        space=space, budget=budget, trials=args.trials, workers=args.workers, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, sampler=args.sampler, seed=args.seed, study=args.study or space.name, storage=args.storage,
        address=args.address, data=args.data, proxy=args.proxy, objectives=objectives, fidelity=args.fidelity,
        rungs=rungs, enqueue=args.enqueue,
        baselines=not args.no_baselines, results=args.results, max_trial_memory_mb=args.max_trial_memory))
    return 0


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite in results/<study>/study.db)")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")


def _retrain(args) -> int:
    from nas.retrain import retrain
    from nas.study import open_existing_study

    study = open_existing_study(args.study, args.storage, args.results)
    _log_file(args.results / args.study)
    retrain(study, args.results / args.study, args.top, args.schedule, args.workers, args.cpus_per_trial,
            args.address, args.gpus_per_trial, args.seeds)
    return 0


def _megabytes(text: str) -> float:
    from nas.budget import parse_bytes

    nbytes = parse_bytes(text)
    if not nbytes:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 800MB or 6GB")
    return nbytes / 1e6


def _rungs(text: str | None, eta: int | None):
    """``--rungs`` and ``--eta``, each at its default where not given; None when neither is (a
    study goes on with the rungs it was started with). Any increasing whole multiples will do: the
    curve is read after every proxy's steps, so at every rung."""
    from nas.schedule import Rungs

    if eta is not None and eta < 2:
        raise UserError("--eta", "", f"{eta} must be at least 2")
    if text is None:
        return None if eta is None else Rungs(eta=eta)
    try:
        multiples = tuple(int(x) for x in text.split(","))
    except ValueError:
        multiples = ()
    if len(multiples) < 2 or multiples[0] < 1 or any(b <= a for a, b in zip(multiples, multiples[1:])):
        raise UserError("--rungs", "", f"{text!r}: expected two or more increasing whole multiples of the proxy's "
                                       "steps, such as 3,9")
    return Rungs(multiples, Rungs().eta if eta is None else eta)


def _at_least(cast, least, kind: str):
    """An argparse type: ``cast`` of the text, refused (argparse's one-line error naming the flag)
    when it is not a number of that kind or is below ``least``."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
        return value
    return parse


_fraction = _at_least(float, 0, "a number")  # GPUs a trial asks for: 0, a share of one, or more
_positive = _at_least(int, 1, "a whole number")


def _bench(args) -> int:
    from nas import bench
    from nas.schedule import Rungs

    search = {"trials": args.trials, "seeds": args.seeds, "space": args.space, "budget": args.budget,
              "proxy": args.proxy, "data": args.data, "objective": args.objective,
              "fidelity_minutes": args.fidelity_minutes, "reference": args.reference,
              "rungs": _rungs(args.rungs, args.eta) or Rungs()}
    designs = tuple(d.strip() for d in args.designs.split(","))
    if not designs or not set(designs) <= {"unshared", "paper"}:
        raise UserError("--designs", "", f"{args.designs!r}: expected unshared, paper or both, comma-separated")
    fidelity = {"proxy": args.proxy, "reference": args.reference, "data": args.data, "jobs": args.jobs,
                "train": not args.no_train}
    if args.jobs > 1:  # the cores shared out among the jobs; alone, bench_fidelity's own default
        fidelity["threads"] = max(1, (os.cpu_count() or 2) // args.jobs)
    runs = {"runs": args.runs} if args.runs else None  # deploy's and decode's
    bench.run(args.which, args.out, search, learn={"designs": designs}, fidelity=fidelity, deploy=runs, decode=runs)
    return 0


def _demo(args) -> int:
    from nas import demo

    _log_file(args.results / (args.study or args.scale))
    demo.run(args.scale, args.results, args.study or args.scale, workers=args.workers, address=args.address)
    return 0


def _report(args) -> int:
    from nas.budget import parse_budget
    from nas.report import write_report
    from nas.retrain import load_retrained
    from nas.study import open_existing_study

    study = open_existing_study(args.study, args.storage, args.results)
    _log_file(args.results / args.study)
    budget = parse_budget(study.user_attrs["settings"]["budget"])
    out = args.results / args.study
    path = write_report(study, out, budget.max_bytes, budget.dtype, retrained=load_retrained(out))
    print(f"report: {path} and {path.with_suffix('.html')}")
    return 0


def _export(args) -> int:
    from nas.budget import parse_budget
    from nas.data.corpus import check_spec
    from nas.export import choose_for_export, write_export
    from nas.study import open_existing_study

    if args.data:
        check_spec(args.data)  # a malformed corpus name is refused before the study is opened
    study = open_existing_study(args.study, args.storage, args.results)
    _log_file(args.results / args.study)
    best_under = parse_budget(args.best_under, "--best-under") if args.best_under else None
    arch, run_dir, provenance = choose_for_export(study, args.results / args.study, args.design, best_under)
    # --dtype defaults to the study's budget dtype: write_export reads it from provenance["budget"]
    write_export(args.out, arch, run_dir, provenance, force=args.force, dtype=args.dtype, data=args.data,
                 activations=args.activations, test_utterances=args.test_utterances, measure=not args.no_measure,
                 progress=True)
    prov = json.loads((args.out / "arch.json").read_text())["provenance"]
    print(f"exported trial {provenance['trial']} to {args.out} at {prov['dtype']}")
    f = prov["onnx_file"]
    print(f"  weights in model.onnx: {f['weights']:,} B; budget arithmetic {f['budget_bytes']:,} B "
          f"({f['difference']:+,} B); scales and zero points {f['quantization_params']:,} B")
    if "deployment" in prov:
        d = prov["deployment"]
        for dt, acc in d["accuracy"].items():
            wers = ", ".join(f"{dec} WER {m['wer']:.2%} CER {m['cer']:.2%}" for dec, m in acc.items())
            mem = d["activation_memory"][dt].get("bytes")
            print(f"  {dt}: {wers}; RTF {d['rtf'][dt]:.4f} (1 thread); activations "
                  f"{'not measured' if mem is None else f'{mem / 1e6:.2f} MB'} (10 s)")
    return 0


def _transcribe(args) -> int:
    # The deployment path: onnxruntime and numpy, no torch (nas.runtime never imports it).
    import time

    from nas.runtime import Recognizer

    t0 = time.perf_counter()
    rec = Recognizer(args.export_dir, threads=args.threads, beam=not args.greedy)
    loaded = time.perf_counter() - t0
    audio_s = 0.0
    t0 = time.perf_counter()
    for audio in args.audio:
        feats = rec.features(audio)
        audio_s += (len(feats) - 1) * rec.frontend.hop_length / rec.frontend.sample_rate
        text = rec.decode(rec.log_probs(feats))
        print(f"{audio}\t{text}" if len(args.audio) > 1 else text, flush=True)
    took = time.perf_counter() - t0
    print(f"{len(args.audio)} file{'s' if len(args.audio) > 1 else ''}, {audio_s:.1f} s of audio in {took:.2f} s "
          f"(real-time factor {took / max(audio_s, 1e-9):.3f}; {rec.decoding}; model loaded in {loaded:.2f} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
