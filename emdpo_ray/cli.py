"""Command line: `emdpo-ray {synth,types,train,mmra,eval,serve}` (also `python -m emdpo_ray`).

Bad input (records, config, matrices) exits with code 2 and one line per problem on stderr,
naming file, line and field; nothing is trained and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings


def _synth(a) -> int:
    from emdpo_ray.data import synth

    shares = [float(s) for s in a.shares.split(",")] if a.shares else None
    records, meta = synth.generate(a.users, a.types, a.rankings_per_user, a.responses,
                                   shares, a.seed, family=a.family)
    if a.conversational:
        records = [synth.as_conversation(r) for r in records]
    synth.write(a.out, records, meta)
    print(f"wrote {len(records)} records from {a.users} users of {a.types} types to {a.out}")
    return 0


def _console():
    from rich.console import Console

    # in a log, progress lines keep their own line rather than rich's 80-column fold
    return Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=140)


def _emit(a, obj: dict, tables) -> None:
    """Tables for people (a terminal, or --format table), the JSON for scripts (a pipe, or
    --format json). Either way the JSON is also in the run directory."""
    fmt = a.format if a.format != "auto" else ("table" if sys.stdout.isatty() else "json")
    if fmt == "json":
        print(json.dumps(obj))
        return
    from rich.console import Console

    # a pipe or a log has no width of its own; rich's 80 columns would fold every cell
    out = Console() if sys.stdout.isatty() else Console(width=140)
    for t in tables():
        out.print(t)


def _step_bars(console):
    """on_steps(phase, done, total, loss) as one rich progress bar per phase."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars: dict = {}

    def on_steps(phase: str, done: int, total: int, loss: float) -> None:
        if phase not in bars:
            p = Progress(TextColumn(f"[bold cyan]emdpo[/] {phase}"), BarColumn(),
                         MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                         TimeElapsedColumn(), console=console, transient=True)
            p.start()
            bars[phase] = (p, p.add_task(phase, total=total, loss=loss))
        p, task = bars[phase]
        p.update(task, completed=done, loss=loss)
        if done >= total:
            p.stop()

    return on_steps


def _num_types(value: str) -> int | str:
    """--types: a whole number >= 1, or auto."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or auto, got {value!r}")
    return k


def _train(a) -> int:
    from emdpo_ray.config import load_config
    from emdpo_ray.train.driver import train
    from emdpo_ray.data.sources import load_records

    cfg = load_config(a.config, a.set)
    load_records(a.data, cfg.data.user_field)  # validate before any Ray start
    from emdpo_ray.report import tables
    from emdpo_ray.run.rundir import RunDir

    console = _console()
    summary = train(cfg, a.data, a.types, a.out, overwrite=a.overwrite, verbose=a.verbose,
                    progress=lambda msg: console.print(f"[bold cyan]emdpo[/] {msg}"),
                    on_steps=_step_bars(console))
    _emit(a, summary, lambda: tables.training(RunDir(a.out).history(), summary))
    return 0


def _types(a) -> int:
    from emdpo_ray.config import load_config
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.report import tables
    from emdpo_ray.train.num_types import types_report

    cfg = load_config(a.config, a.set)
    rep = types_report(load_records(a.data, cfg.data.user_field), cfg, a.max_types, a.model,
                       a.holdout, a.features)
    _emit(a, rep, lambda: [tables.types(rep)])
    return 0


def _mmra(a) -> int:
    from emdpo_ray.core import mmra

    if a.matrix:
        from emdpo_ray.data.sources import read_bytes

        try:
            obj = json.loads(read_bytes(a.matrix).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise mmra.MatrixError(f"{a.matrix}: not valid JSON: {e}") from None
        if isinstance(obj, dict):
            if "L" not in obj:
                raise mmra.MatrixError(f"{a.matrix}: L: missing")
            unknown = set(obj) - {"L", "type_weights"}
            if unknown:
                raise mmra.MatrixError(f"{a.matrix}: {sorted(unknown)[0]}: unknown key")
            L, c = obj["L"], obj.get("type_weights")
        else:
            L, c = obj, None
        try:
            result = mmra.solve(L, c)
        except mmra.MatrixError as e:
            raise mmra.MatrixError(f"{a.matrix}: {e}") from None
        print(json.dumps(result.to_json()))
        return 0
    from emdpo_ray.run.rundir import RunDir
    from emdpo_ray.train.mmra_run import run_mmra

    from emdpo_ray.report import tables

    rd = RunDir.open(a.run)
    out = run_mmra(rd, progress=lambda msg: _console().print(f"[bold cyan]emdpo[/] {msg}"))
    rd.push_all()
    _emit(a, {k: out[k] for k in ("weights", "max_regret", "regret")}, lambda: [tables.mmra(out)])
    return 0


def _eval(a) -> int:
    from emdpo_ray.report.evaluate import evaluate_run
    from emdpo_ray.run.rundir import RunDir

    from emdpo_ray.report import tables

    out = evaluate_run(RunDir.open(a.run), a.data, online=a.online)
    _emit(a, out, lambda: tables.evaluation(out))
    return 0


def _serve(a) -> int:
    from emdpo_ray.serve.app import serve_main

    return serve_main(a)


def _format_arg(p) -> None:
    p.add_argument("--format", choices=("auto", "table", "json"), default="auto", help=(
        "tables for people or JSON for scripts; auto: tables on a terminal, JSON in a pipe"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emdpo-ray", description=(
        "EM-DPO on Ray: find latent user types in preference rankings, train one DPO policy "
        "per type, and serve them behind a min-max-regret router."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write synthetic typed users (JSONL with true_type)")
    s.add_argument("--out", required=True, help="output JSONL file")
    s.add_argument("--users", type=int, default=120)
    s.add_argument("--types", type=int, default=3)
    s.add_argument("--rankings-per-user", type=int, default=8)
    s.add_argument("--responses", type=int, default=3, help="responses per ranking")
    s.add_argument("--shares", default=None, help="type shares, e.g. 0.5,0.3,0.2")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--family", choices=("linear", "contextual", "order", "lead_topic"),
                   default="linear",
                   help="linear: preferences over word counts; contextual: they flip with "
                        "the prompt's topic; order: same words, the first sentence decides; "
                        "lead_topic: they flip with which of the prompt's two topics comes "
                        "first")
    s.add_argument("--conversational", action="store_true",
                   help="write prompts and responses as chat messages (TRL's conversational format)")
    s.set_defaults(fn=_synth)

    k = sub.add_parser("types", help=(
        "how many types? held-out likelihood of the start's linear mixture as K grows"),
        description=(
            "Fit the start's linear Plackett-Luce mixture for K = 1, 2, ... without a fifth "
            "of every user's rankings and score how well it predicts them; K grows while "
            "one more type raises that beyond noise (95%% interval of the gain above 1e-3 "
            "nats per ranking). "
            "It sees what its features see: token counts miss preferences that depend on "
            "the order of words or on the prompt; --features tokens_by_prompt crosses them "
            "with the prompt's words, --model gives a model's states instead, and with "
            "--model, --features tokens_by_prompt_state crosses the counts with the model's "
            "reading of the prompt."))
    k.add_argument("--data", required=True, help="records: .jsonl or .parquet, local or s3://")
    k.add_argument("--max-types", type=int, default=6, help="largest K tried")
    k.add_argument("--features", choices=["tokens", "tokens_by_prompt", "tokens_by_prompt_state"],
                   default="tokens",
                   help="token counts, or the counts crossed with the prompt's directions "
                        "along which users' preferences co-vary, of its words or (with "
                        "--model) of the model's last state of it (default: %(default)s)")
    k.add_argument("--model", help="features from this model's states (a directory or a "
                                   "named model) instead of token counts")
    k.add_argument("--holdout", type=float, default=0.2,
                   help="share of each user's rankings held out to score every K")
    k.add_argument("--config", help="YAML config file (seed, em.init_l2, em.init_restarts)")
    k.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    _format_arg(k)
    k.set_defaults(fn=_types)

    t = sub.add_parser("train", help="run EM-DPO on Ray and write a run directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "main knobs (--set key=value), defaults shown:\n"
                           "  em.max_iterations=3  em.init=kmeans|random|labels  "
                           "em.warm_start=true  em.warm_epochs=1  em.cross_fit=false\n"
                           "  em.final_epochs=4  em.init_split_merge=6  em.guard_holdout=0.2  "
                           "em.guard_level=0.9  em.max_types=6\n"
                           "  em.reward_temperature=1.0|fit\n"
                           "  dpo.beta=1.0  dpo.learning_rate=1e-3  dpo.epochs=2  "
                           "dpo.min_steps=60  dpo.batch_size=32\n"
                           "  model.name_or_path=DIR|HF_ID|smollm2-135m-instruct  "
                           "model.finetune=lora|full  model.lora.r=8\n"
                           "  ray.num_workers=1  ray.cpus_per_worker=1  ray.zero_stage=0  "
                           "ray.use_gpu=false\n"
                           "  mmra.enabled=true  mmra.single_dpo_baseline=false"))
    t.add_argument("--data", required=True, help="records: .jsonl or .parquet, local or s3://")
    t.add_argument("--types", type=_num_types, required=True, help=(
        "number of latent types K, or auto: K grows from 1 while one more type of the start's "
        "mixture predicts held-out rankings better beyond noise (up to em.max_types; "
        "`emdpo-ray types` shows the figures)"))
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    t.add_argument("--overwrite", action="store_true", help="start over in an existing --out")
    t.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    _format_arg(t)
    t.set_defaults(fn=_train)

    m = sub.add_parser("mmra", help="min-max regret weights from a matrix or a run")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--matrix", help='JSON: {"L": [[...]], "type_weights": [...]} or rows')
    g.add_argument("--run", help="run directory: estimate L and write mmra.json")
    _format_arg(m)
    m.set_defaults(fn=_mmra)

    e = sub.add_parser("eval", help="metrics of a run on records (JSON)")
    e.add_argument("--run", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--online", action="store_true", help=(
        "also simulate new users giving feedback: how many rankings (ternary vs binary) "
        "until they are routed to their true type"))
    _format_arg(e)
    e.set_defaults(fn=_eval)

    v = sub.add_parser("serve", help="serve the K policies behind the MMRA router")
    v.add_argument("--run", required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000,
                   help="HTTP port (0: a free one, printed; not with --print-config)")
    v.add_argument("--print-config", action="store_true",
                   help="print a Serve config YAML (serve deploy / RayService) and exit")
    v.set_defaults(fn=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from emdpo_ray.utils import quiet_ray_logs

        quiet_ray_logs()
        warnings.filterwarnings("ignore")
    if args.command in ("train", "mmra", "eval", "serve"):
        import torch

        if not torch.cuda.is_available():  # skip DeepSpeed's accelerator probe and its warning
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from emdpo_ray.config import ConfigError
    from emdpo_ray.core.mmra import MatrixError
    from emdpo_ray.data.records import RecordError
    from emdpo_ray.models.loading import UnsafeModelError
    from emdpo_ray.run.rundir import RunDirError

    try:
        return args.fn(args)
    except (RecordError, ConfigError, MatrixError, RunDirError, UnsafeModelError) as e:
        for line in str(e).splitlines():
            print(f"emdpo-ray {args.command}: error: {line}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"emdpo-ray {args.command}: not available yet: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
