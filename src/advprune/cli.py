"""The ``advprune`` command line.

Commands: ``train`` (dense, adversarial or natural), ``prune`` (apply a method to a
checkpoint), ``finetune`` (train a pruned checkpoint), ``eval`` (AutoAttack, HO-FMN, PGD),
``info`` (checkpoint card and measured sparsity), ``methods``, ``export`` (dense or compressed
checkpoint of a pruned one), ``compact`` (physically thinner model of a filters / channels-pruned
one), ``profile`` (parameters, MACs, file sizes and latency against the dense model),
``quickstart``.

Settings come from ``--config FILE.yaml`` and are overridden by the flags given explicitly;
fractions such as ``--eps 8/255`` are exact. Bad input prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from advprune.errors import AdvpruneError
from advprune.progress import add_progress_flag, process_default

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_common(p: argparse.ArgumentParser, *, training: bool) -> None:
    """Flags shared by the run commands; every default is None (= not set by the user)."""
    p.add_argument("--config", type=Path, help="YAML file of settings (flags override it)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (default), cifar10, cifar100, svhn, imagefolder")
    g.add_argument("--data-root", dest="data_root", help="folder holding the dataset files")
    g.add_argument("--download", type=_bool, nargs="?", const=True, help="fetch official files")
    g.add_argument(
        "--batch-size", dest="batch_size", type=int, help="global batch (split over processes)"
    )
    g.add_argument("--workers", type=int, help="DataLoader workers per process (image folders)")
    g.add_argument("--val-fraction", dest="val_fraction", type=float)
    g.add_argument(
        "--n",
        "--eval-n",
        dest="n",
        type=int,
        help="evaluate on the first N test samples only (--eval-n under torchrun, whose own "
        "flags --n would abbreviate)",
    )
    g = p.add_argument_group("threat model")
    g.add_argument("--eps", help="attack radius in input units, e.g. 8/255 (default per dataset)")
    g.add_argument("--norm", help="linf (default) or l2")
    g.add_argument("--eval-steps", dest="eval_steps", type=int, help="PGD steps for evaluation")
    if training:
        g.add_argument(
            "--objective",
            help="natural, pgd (default), trades, mart, fast, smooth, ibp, crown-ibp, mixtrain",
        )
        g.add_argument("--step-size", dest="step_size", help="attack step, e.g. 2/255")
        g.add_argument("--attack-steps", dest="attack_steps", type=int)
        g.add_argument("--beta", type=float, help="TRADES / MART beta")
        g.add_argument("--attack-mode", dest="attack_mode", help="eval (default), train, keep")
        g = p.add_argument_group("certified objectives (smooth, ibp, crown-ibp, mixtrain)")
        g.add_argument("--sigma", type=float, help="smooth: Gaussian noise std (0.25)")
        g.add_argument("--noise-samples", dest="noise_samples", type=int, help="smooth: copies")
        g.add_argument(
            "--smooth-variant",
            dest="smooth_variant",
            help="gaussian (default), stability, consistency, adversarial",
        )
        g.add_argument("--kappa-start", dest="kappa_start", type=float, help="ibp / crown-ibp")
        g.add_argument("--kappa-end", dest="kappa_end", type=float, help="ibp / crown-ibp")
        g.add_argument("--ramp-start", dest="ramp_start", type=float, help="eps ramp start (0)")
        g.add_argument(
            "--ramp-length", dest="ramp_length", type=float, help="eps ramp, stage fraction"
        )
        g.add_argument("--bound", help="mixtrain's bound: crown-ibp (default), ibp, crown")
        g.add_argument("--ver-subset", dest="ver_subset", type=int, help="mixtrain: points (5)")
        g.add_argument(
            "--objective-option",
            dest="objective_options",
            action="append",
            type=_option,
            metavar="KEY=VALUE",
            help="another objective option (repeatable), e.g. --objective-option eta=0.5",
        )
        g = p.add_argument_group("optimisation")
        _add_train_flags(g)
        g.add_argument("--augment", type=_bool, nargs="?", const=True)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--out", help="output folder")
    add_progress_flag(g)


def _floats(text: str) -> list[float]:
    """``0.5,0.75`` -> ``[0.5, 0.75]``."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _add_train_flags(g: Any) -> None:
    """One flag per field of TrainConfig (the definition the YAML keys come from too):
    ``--epochs``, ``--lr``, ``--momentum``, ``--weight-decay``, ``--nesterov``,
    ``--schedule``, ``--milestones``, ``--gamma``, ``--warmup-epochs``, ``--amp``,
    ``--grad-clip``."""
    import dataclasses
    import typing

    from advprune.config import TRAIN_FIELDS
    from advprune.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    for name in TRAIN_FIELDS:
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) is not tuple and args else hint
        kwargs: dict[str, Any] = {"dest": name, "help": meta[name].get("help")}
        if base is bool:
            kwargs.update(type=_bool, nargs="?", const=True)
        elif typing.get_origin(hint) is tuple:
            kwargs.update(type=_floats, metavar="X,Y")
        elif base in (int, float):
            kwargs["type"] = base
        g.add_argument("--" + name.replace("_", "-"), **kwargs)


def _add_prune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--method", help="pruning method (see `advprune methods`)")
    g.add_argument("--sparsity", help="removed fraction in [0, 1), e.g. 0.99")
    g.add_argument(
        "--structure", help="unstructured (default), filters, channels, or N:M such as 2:4"
    )
    g.add_argument("--scope", help="local (default) or global")
    g.add_argument("--allocation", help="layer allocation: uniform, erk, lamp, global, np")
    g.add_argument("--allocation-p", dest="allocation_p", type=float, help="p of the np rule")
    g.add_argument("--keep-first", dest="keep_first", type=_bool, nargs="?", const=True)
    g.add_argument("--keep-last", dest="keep_last", type=_bool, nargs="?", const=True)
    g.add_argument(
        "--option",
        dest="method_options",
        action="append",
        type=_option,
        metavar="KEY=VALUE",
        help="a method option (repeatable), e.g. --option freeze_bn=true",
    )


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (numbers, booleans, lists; ``8/255`` stays text)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


_EVAL_ONLY = (
    "checkpoint_path",
    "auto_batch",
    "hofmn_cache",
    "compile",
    "channels_last",
    "attacks",
    "attack_options",
    "aa_version",
    "fmn_steps",
    "hofmn_trials",
    "hofmn_tune_steps",
    "hofmn_tune_batch",
    "check_n",
    "eps_grid",
    "certify",
    "n0",
    "smoothing_n",
    "alpha",
    "radii",
)


def _add_eval(p: argparse.ArgumentParser) -> None:
    """Flags of ``eval`` only (not RunConfig settings); every default is None."""
    g = p.add_argument_group("evaluation (--eval-steps: PGD steps; --out DIR: write and resume)")
    from advprune.evaluation.attacks import attacks_help, list_attacks

    g.add_argument("--attacks", help=attacks_help())
    g.add_argument(
        "--attack-option",
        dest="attack_options",
        action="append",
        type=_option,
        metavar="ATTACK.KEY=VALUE",
        help="an option of one attack (repeatable), e.g. --attack-option pgd.steps=50",
    )
    g.add_argument("--aa-version", dest="aa_version", help="standard (default), plus, rand")
    g.add_argument("--fmn-steps", dest="fmn_steps", type=int, help="FMN / HO-FMN steps (200)")
    g.add_argument("--hofmn-trials", dest="hofmn_trials", type=int, help="tuning trials (32)")
    g.add_argument(
        "--hofmn-tune-steps", dest="hofmn_tune_steps", type=int, help="FMN steps per trial (100)"
    )
    g.add_argument(
        "--hofmn-tune-batch", dest="hofmn_tune_batch", type=int, help="trial batch size (64)"
    )
    g.add_argument("--check-n", dest="check_n", type=int, help="points of the PGD probe (256)")
    g.add_argument(
        "--auto-batch",
        dest="auto_batch",
        action="store_true",
        default=None,
        help="attack batch: the largest that fits on the GPU (128 on a CPU), recorded in the "
        "report and kept when the run resumes (instead of --batch-size)",
    )
    g.add_argument(
        "--hofmn-cache",
        dest="hofmn_cache",
        metavar="DIR|off",
        help="tuned HO-FMN configurations by model (default $ADVPRUNE_CACHE/hofmn, else "
        "~/.cache/advprune/hofmn): a later run on the same model reuses its tuning",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="compile the attacks' forward passes without gradients (Square's queries, "
        "re-checks) with torch.compile: seconds to compile once per process (on a 2-core CPU "
        "it cost more than it saved); the same results up to float rounding",
    )
    g.add_argument(
        "--channels-last",
        dest="channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="attacks in channels-last memory format (default: on for CUDA)",
    )
    g.add_argument(
        "--eps-grid",
        dest="eps_grid",
        help="security-curve grid, comma-separated, e.g. 0,2/255,4/255,8/255,16/255 "
        "(default: 101 points on [0, 2 eps]; eps is always included)",
    )
    g = p.add_argument_group("certification (--certify; without --attacks no attack runs)")
    g.add_argument(
        "--certify",
        help=f"comma-separated: {', '.join(list_attacks(kind='certified'))} (ibp, crown-ibp, "
        "crown: verified accuracy at --eps, L∞; smoothing: certified accuracy at L2 radii)",
    )
    g.add_argument(
        "--sigma", type=float, help="smoothing noise std (default: the training sigma, or 0.25)"
    )
    g.add_argument("--n0", type=int, help="smoothing selection samples (100)")
    g.add_argument(
        "--smoothing-n", dest="smoothing_n", type=int, help="smoothing samples per point (10000)"
    )
    g.add_argument("--alpha", type=float, help="smoothing failure probability (0.001)")
    g.add_argument("--radii", help="smoothing L2 radii, e.g. 0,0.25,0.5,0.75,1")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``advprune``."""
    from advprune._version import __version__

    parser = _Parser(
        prog="advprune",
        description="Adversarial pruning: prune, train robustly, evaluate exactly.",
    )
    parser.add_argument("--version", action="version", version=f"advprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a dense model (pretrain stage)")
    p.add_argument("--model", help="architecture (see advprune.models.list_models)")
    p.add_argument("--checkpoint", help="start from this checkpoint instead of a fresh model")
    _add_common(p, training=True)

    p = sub.add_parser(
        "prune", help="prune with a method (trains scores / rates if the method does)"
    )
    p.add_argument(
        "--checkpoint",
        help="trained dense checkpoint to prune (required unless the method prunes at init)",
    )
    p.add_argument("--model", help="architecture for methods that prune a fresh network")
    _add_prune(p)
    _add_common(p, training=True)

    p = sub.add_parser("finetune", help="train a pruned checkpoint (its method's finetune stage)")
    p.add_argument("--checkpoint", help="pruned checkpoint (required)")
    p.add_argument(
        "--stage",
        dest="stage",
        help="the method's stage to run (default finetune; any stage after prune that trains)",
    )
    _add_common(p, training=True)

    p = sub.add_parser(
        "eval",
        help="robustness evaluation: AutoAttack, HO-FMN distances, security curve, checks",
    )
    p.add_argument(
        "checkpoint_path", nargs="?", metavar="CHECKPOINT", help="checkpoint to evaluate"
    )
    p.add_argument("--checkpoint", help="the same as CHECKPOINT")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--profile",
        action="store_true",
        default=None,
        help="also measure what the pruning bought (`advprune profile`: parameters, MACs, file "
        "sizes, CPU latency at batch 1 and 256 against the dense model) into the report",
    )
    _add_eval(p)
    _add_common(p, training=False)

    p = sub.add_parser("info", help="show a checkpoint's card and measured sparsity")
    p.add_argument("path", help="checkpoint (.safetensors or .json)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")

    sub.add_parser("methods", help="list pruning methods and their taxonomy entries")

    p = sub.add_parser(
        "export", help="fold a pruned checkpoint's masks into a plain dense (or compressed) one"
    )
    p.add_argument("path", help="pruned checkpoint (.safetensors or .json)")
    p.add_argument("--out", required=True, help="output folder (gets model.safetensors + .json)")
    p.add_argument(
        "--compressed",
        action="store_true",
        help="store the weights compressed: per tensor a bitmask plus the kept values, or CSR, "
        "whichever is smallest (exact; load_checkpoint reads it)",
    )

    p = sub.add_parser(
        "compact",
        help="physically remove pruned filters / channels: a thinner plain model (Torch-Pruning)",
    )
    p.add_argument("path", help="filters / channels-pruned checkpoint")
    p.add_argument("--out", required=True, help="output folder (gets model.safetensors + .json)")
    p.add_argument(
        "--round-to",
        dest="round_to",
        type=int,
        help="keep a few more channels so every width is a multiple of this (faster kernels)",
    )
    p.add_argument("--json", dest="as_json", action="store_true", help="print the record as JSON")

    p = sub.add_parser(
        "profile",
        help="parameters, MACs, file sizes and measured latency against the dense base model",
    )
    p.add_argument("path", help="checkpoint: masked, compacted, compressed or dense")
    p.add_argument(
        "--batch-sizes", dest="batch_sizes", default="1,256", help="timed batch sizes (1,256)"
    )
    p.add_argument("--repeats", type=int, default=10, help="timed runs per batch (median; 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (3)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, stated)")
    p.add_argument(
        "--device", default="auto", help="auto (CPU, plus CUDA when present), cpu or cuda"
    )
    p.add_argument(
        "--channels-last", dest="channels_last", action="store_true",
        help="time in channels-last memory format (often faster on CPU)",
    )  # fmt: skip
    p.add_argument("--no-latency", dest="no_latency", action="store_true", help="count only")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    p.add_argument("--out", help="also write the profile as JSON to this file")

    p = sub.add_parser("quickstart", help="the embedded digits demo (< 3 minutes on a CPU)")
    p.add_argument("--out", default="quickstart_out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_progress_flag(p)

    from advprune.bench.commands import register_all

    p = sub.add_parser("bench", help="results store and grid runs of the benchmark")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    register_all(sub, bench)
    return parser


_NOT_CONFIG = {"command", "config", "as_json", "path", "stage", "profile"}


def _run_config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    from advprune.config import load_config

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    if isinstance(overrides.get("objective_options"), list):  # repeated KEY=VALUE pairs
        overrides["objective_options"] = dict(overrides["objective_options"])
    return load_config(args.config, overrides, base=base)


def _require_checkpoint(cfg: Any, command: str, why: str = "") -> None:
    if not cfg.checkpoint:
        reason = f" ({why})" if why else ""
        raise AdvpruneError(
            f"`advprune {command}` needs --checkpoint PATH (or `checkpoint:` in the YAML)" + reason
        )


def _check_out(cfg: Any) -> None:
    """Refuse to write into the folder of the input checkpoint (it would be overwritten, and a
    training stage would try to resume the run that produced it)."""
    from advprune.checkpoint import tensor_path

    if cfg.checkpoint and Path(cfg.out).resolve() == tensor_path(cfg.checkpoint).resolve().parent:
        raise AdvpruneError(
            f"the output folder {cfg.out} holds the input checkpoint {cfg.checkpoint}; "
            "pass --out NEW_FOLDER so the input is not overwritten"
        )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


@contextlib.contextmanager
def _processes(cfg: Any) -> Iterator[Any]:
    """The processes of a training command: one, or the process group torchrun started
    (``torchrun --nproc-per-node N -m advprune.cli train ...``), left at the end."""
    from advprune.distributed import init_distributed, shutdown

    dist = init_distributed(cfg.device)
    finished = False
    try:
        yield dist
        finished = True
    finally:
        shutdown(wait=finished)


def cmd_train(args: argparse.Namespace) -> int:
    from advprune import pipeline as wf

    cfg = _run_config(args)
    _check_out(cfg)
    with _processes(cfg) as dist:
        data = wf.prepare_data(cfg)
        model, card = wf.build_model(cfg, data)
        if card and card.get("masks"):
            raise AdvpruneError(f"{cfg.checkpoint} is pruned; use `advprune finetune` for it")
        out = Path(cfg.out)
        model, card = wf.train_stage(cfg, data, model, out=out)  # the dense pretrain stage
        metrics = wf.evaluate(cfg, data, model)
        if dist.is_main:
            _print_summary("train", out / wf.MODEL_FILE, metrics)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from advprune import pipeline as wf
    from advprune.sparsity import sparsity_report

    if args.method_options:
        args.method_options = dict(args.method_options)
    cfg = _run_config(args)
    method = wf.make_method(cfg)  # validates the method, its options and structure first
    if method.needs_pretrained:
        _require_checkpoint(cfg, "prune", f"method {method.name!r} prunes a trained model")
    _check_out(cfg)
    with _processes(cfg) as dist:
        data = wf.prepare_data(cfg, with_val=bool(method.trainable("prune")))
        model, card = wf.build_model(cfg, data)
        if card and card.get("masks"):
            raise AdvpruneError(f"{cfg.checkpoint} is already pruned; prune its dense parent")
        out = Path(cfg.out)
        pruned, card = wf.run_stage("prune", cfg, data, model, out=out)
        if dist.is_main:
            print(sparsity_report(pruned, tuple(data.splits.info.input_shape)).format())
            skipped = (card.get("sparsity") or {}).get("skipped_layers") or {}
            for name, why in skipped.items():
                print(f"not pruned: {name}: {why}")
            print(f"saved {out / wf.MODEL_FILE}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from advprune import pipeline as wf

    cfg = _run_config(args)
    _require_checkpoint(cfg, "finetune")
    _check_out(cfg)
    stage = args.stage or "finetune"
    with _processes(cfg) as dist:
        data = wf.prepare_data(cfg)
        model, card = wf.build_model(cfg, data)
        out = Path(cfg.out)
        model, _ = wf.run_stage(stage, cfg, data, model, card, out=out)
        metrics = wf.evaluate(cfg, data, model)
        if dist.is_main:
            _print_summary(stage, out / wf.MODEL_FILE, metrics)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from advprune import pipeline as wf
    from advprune.bench.keys import card_key_parts
    from advprune.evaluation import DEFAULT_ATTACKS, evaluate, parse_attacks
    from advprune.sparsity import sparsity_report
    from advprune.sparsity.profiling import sparsity_vs_base

    extra = {k: getattr(args, k) for k in _EVAL_ONLY}
    rest = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _EVAL_ONLY})
    path = extra.pop("checkpoint_path")
    if path is not None:
        if rest.checkpoint is not None and rest.checkpoint != path:
            raise AdvpruneError(
                f"two checkpoints given ({path} and --checkpoint {rest.checkpoint})"
            )
        rest.checkpoint = path
    cfg = _run_config(rest)
    _require_checkpoint(cfg, "eval")
    certify = extra.pop("certify")
    cert_opts = {k: extra.pop(k) for k in ("n0", "smoothing_n", "alpha", "radii")}
    attacks_text = extra.pop("attacks")
    run_attacks = attacks_text is not None or certify is None
    attacks = parse_attacks(attacks_text or ",".join(DEFAULT_ATTACKS)) if run_attacks else []
    certifiers = _certifiers(certify, cert_opts) if certify is not None else None
    options = {k: v for k, v in extra.items() if v is not None}
    if options.pop("auto_batch", False):
        if "batch_size" in cfg.model_fields_set:
            raise AdvpruneError("give --batch-size or --auto-batch, not both")
        options["batch_size"] = "auto"
    if str(options.get("hofmn_cache", "")).lower() in ("off", "none", "false", "no"):
        options["hofmn_cache"] = False
    if options.get("attack_options"):  # [("pgd.steps", 50), ...] -> {"pgd": {"steps": 50}}
        by_attack: dict[str, dict[str, Any]] = {}
        for key, value in options["attack_options"]:
            attack, sep, name = key.partition(".")
            if not sep or not name:
                raise AdvpruneError(f"--attack-option needs ATTACK.KEY=VALUE, got {key!r}")
            by_attack.setdefault(attack, {})[name] = value
        options["attack_options"] = by_attack
    data = wf.prepare_data(cfg, with_val=False)
    model, card = wf.build_model(cfg, data)
    shape = tuple(data.splits.info.input_shape)
    compacted = bool(card and card.get("compaction"))
    model_info = {
        "name": model.spec.name,
        "checkpoint": str(cfg.checkpoint),
        "checkpoint_sha256": (card.get("tensors") or {}).get("sha256") if card else None,
        "method": (card.get("method") or {}).get("name") if card else None,
        # a compacted model's sparsity counts its removed channels (against the dense base)
        "measured_sparsity": sparsity_vs_base(model)
        if compacted
        else sparsity_report(model, shape).sparsity,
    }
    if compacted:
        model_info["compacted"] = True
    if card:  # what `bench add` derives the model key from
        model_info["key_parts"] = card_key_parts(card, model_info["measured_sparsity"])
    if args.profile:  # what the pruning bought, measured before the attacks run
        from advprune.checkpoint import profile_checkpoint

        model_info["profile"] = profile_checkpoint(cfg.checkpoint, model, card).summary()
    out = cfg.out if "out" in cfg.model_fields_set else None
    if certifiers is not None:  # unsupported layers, sigma, eps: refused before any attack
        from advprune.evaluation.certifiers import check_certifiers

        opts = _certify_settings(cfg, card, certifiers)
        check_certifiers(model, shape, opts["methods"], eps=opts["eps"], norm=opts["norm"],
                         sigma=opts["sigma"])  # fmt: skip
    # under torchrun the attacks' batches are sharded over the processes; rank 0 gathers
    # them, writes the report and prints it (certifiers run on rank 0)
    with _processes(cfg) as dist:
        if not run_attacks:
            if not dist.is_main:
                return 0
            return _certify_only(args, cfg, data, model, card, model_info, certifiers, out)
        options.setdefault("batch_size", cfg.batch_size)
        report = evaluate(
            model,
            data.splits,
            eps=cfg.eps_text(),
            norm=cfg.norm,
            attacks=attacks,
            n=cfg.n,
            seed=cfg.seed,
            pgd_steps=cfg.eval_steps,
            out=out,
            device=wf.resolve_device(cfg.device),
            progress=cfg.progress,
            model_info=model_info,
            **options,
        )
        if not dist.is_main:
            return 0
        if certifiers is not None:
            _add_certified(report, cfg, data, model, card, certifiers, out)
        return _show_report(args, report, out, "per_sample.npz and the security curve")


def _show_report(args: argparse.Namespace, report: Any, out: str | None, files: str) -> int:
    if args.as_json:
        _print_json(report.to_dict())
    else:
        print(report.format())
        _print_certified(report)
        if out is not None:
            print(f"wrote {Path(out) / 'report.json'}, {files}")
    return 0


def _certifiers(text: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Parse ``--certify`` and the smoothing settings (checked before any data is read)."""
    from advprune.evaluation.certifiers import certifier_settings

    return certifier_settings(text, **opts)


def _certify_settings(cfg: Any, card: dict[str, Any] | None, certifiers: dict[str, Any]):
    """Keyword arguments of :func:`advprune.evaluation.certifiers.certified_entries` but the model
    and data; sigma defaults to the one the checkpoint was trained with (else 0.25)."""
    from advprune import pipeline as wf

    sigma = cfg.sigma
    objective = (card or {}).get("objective") or {}
    if sigma is None and isinstance(objective, dict) and objective.get("name") == "smooth":
        sigma = objective.get("sigma")  # the noise the model was trained with
    return {
        "methods": certifiers["methods"],
        "eps": cfg.eps_text(),
        "norm": cfg.norm,
        "n": cfg.n,
        "sigma": 0.25 if sigma is None else sigma,
        "n0": certifiers["n0"],
        "samples": certifiers["samples"],
        "alpha": certifiers["alpha"],
        "radii": certifiers["radii"],
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "progress": cfg.progress,
        "device": wf.resolve_device(cfg.device),
    }


def _certify_only(args, cfg, data, model, card, model_info, certifiers, out) -> int:
    from advprune.evaluation.certifiers import certify_report

    info = data.splits.info
    report = certify_report(
        model,
        data.splits.test,
        num_classes=info.num_classes,
        dataset_name=info.name,
        model_info=model_info,
        out=out,
        **_certify_settings(cfg, card, certifiers),
    )
    return _show_report(args, report, out, "certified_per_sample.npz")


def _add_certified(report, cfg, data, model, card, certifiers, out) -> None:
    """Append the certified entries to a report of attacks (and rewrite it in ``out``)."""
    from advprune.evaluation.certifiers import add_certified

    add_certified(report, model, data.splits.test, num_classes=data.splits.info.num_classes,
                  out=out, **_certify_settings(cfg, card, certifiers))  # fmt: skip


def _print_certified(report: Any) -> None:
    """Smoothing's certified accuracy per radius (the report table shows one number each)."""
    for e in report.entries:
        if e.kind == "certified" and e.robust_accuracy_at:
            radii = "  ".join(f"r={r}: {100 * a:.2f}%" for r, a in e.robust_accuracy_at.items())
            print(f"  {e.name} (L2, sigma {e.config.get('sigma')}): {radii}"
                  f"  abstain {100 * e.details.get('abstention_rate', 0):.2f}%")  # fmt: skip


def _print_summary(stage: str, path: Path, m: dict[str, Any]) -> None:
    print(
        f"{stage}: clean {100 * m['clean_accuracy']:.2f}%  robust {100 * m['robust_accuracy']:.2f}%"
        f"  ({m['attack']}, eps {m['eps']}, n={m['n']})  sparsity {m['measured_sparsity']:.4f}"
        f"  -> {path}"
    )


def cmd_info(args: argparse.Namespace) -> int:
    from advprune.checkpoint import load_checkpoint, tensor_path
    from advprune.sparsity import sparsity_report

    model, card = load_checkpoint(args.path)
    # load_checkpoint validated the architecture and tensors; other card fields may be absent
    spec = model.spec
    shape = list(card.get("input_shape") or spec.input_size)
    report = sparsity_report(model, tuple(shape))
    if args.as_json:
        _print_json({"card": card, "sparsity_report": report.to_dict()})
        return 0
    print(f"checkpoint   {args.path}")
    print(f"architecture {spec.name} ({spec.num_classes} classes, input {shape})")
    print(f"normalize    mean {list(spec.mean)} std {list(spec.std)}")
    for key in ("dataset", "method", "objective"):
        value = card.get(key)
        if isinstance(value, dict):
            value = value.get("name")
        print(f"{key:<12} {value}")
    print(f"eps          {card.get('eps')} ({card.get('norm')})")
    sha = str((card.get("tensors") or {}).get("sha256") or "none")
    print(f"advprune     {card.get('advprune_version')}  sha256 {sha[:16]}")
    encoding = (card.get("tensors") or {}).get("encoding")
    if encoding:
        print(f"tensors      {encoding} ({tensor_path(args.path).stat().st_size:,} bytes)")
    compaction = card.get("compaction")
    if isinstance(compaction, dict):
        params = compaction.get("params") or {}
        print(f"compacted    {params.get('compacted'):,} parameters of the dense "
              f"{params.get('base'):,}; the layers' widths are in the card")  # fmt: skip
    print(report.format())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from advprune.methods import list_methods, method_class

    # the benchmark's classification (legend codes; advprune taxonomy explains them), then
    # what advprune implements: accepted structures / scopes and the stages
    for name in list_methods():
        cls = method_class(name)
        apb = " ".join(
            f"{field}={value if isinstance(value, str) else ','.join(value)}"
            for field, value in cls.taxonomy.classification().items()
            if value is not None
        )
        print(
            f"{name:<14} {apb} | implements structures={','.join(cls.structures)} "
            f"scopes={','.join(cls.scopes)} stages={'->'.join(cls.stages)}"
        )
    return 0


def _output_file(args: argparse.Namespace) -> Path:
    """``OUT/model.safetensors``, refused when it is the input checkpoint."""
    from advprune.checkpoint import tensor_path

    dst = Path(args.out) / "model.safetensors"
    if dst.resolve() == tensor_path(args.path).resolve():
        raise AdvpruneError(f"--out {args.out} holds the input checkpoint; pass a new folder")
    return dst


def cmd_export(args: argparse.Namespace) -> int:
    from advprune.checkpoint import export_checkpoint, load_checkpoint
    from advprune.sparsity.profiling import state_dict_bytes

    path = export_checkpoint(args.path, _output_file(args), compressed=args.compressed)
    if not args.compressed:
        print(f"exported {args.path} -> {path} (plain architecture, masks folded in)")
        return 0
    model, _ = load_checkpoint(path)  # read back: what a user will load
    dense = state_dict_bytes(model.state_dict())
    size = path.stat().st_size
    print(
        f"exported {args.path} -> {path} (compressed, masks folded in): {size:,} bytes, "
        f"{100 * size / dense:.2f} % of the {dense:,}-byte plain file; load_checkpoint reads "
        "it back exactly"
    )
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from advprune.checkpoint import compact_checkpoint, read_card, tensor_path

    if args.round_to is not None and args.round_to < 1:
        raise AdvpruneError(f"--round-to must be >= 1, got {args.round_to}")
    path, record = compact_checkpoint(args.path, _output_file(args), round_to=args.round_to)
    card = read_card(path)
    if args.as_json:
        _print_json({"path": str(path), "compaction": card["compaction"]})
        return 0
    params = card["compaction"]["params"]
    before, after = tensor_path(args.path).stat().st_size, path.stat().st_size
    print(record.format())
    print(
        f"compacted {args.path} -> {path}: {params['compacted']:,} parameters "
        f"({100 * params['compacted'] / params['base']:.2f} % of the dense {params['base']:,}), "
        f"file {before:,} -> {after:,} bytes; every layer's width is in its card"
    )
    return 0


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise AdvpruneError(f"--batch-sizes needs integers >= 1 such as 1,256, got {text!r}")
    return sizes


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from advprune.checkpoint import load_checkpoint, profile_checkpoint, write_json_atomic
    from advprune.sparsity import nm_layers, semi_structured_support

    if args.device not in ("auto", "cpu", "cuda"):
        raise AdvpruneError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise AdvpruneError("--device cuda requested but CUDA is not available")
    if args.repeats < 1 or args.warmup < 0:
        raise AdvpruneError("--repeats must be >= 1 and --warmup >= 0")
    devices = None if args.device == "auto" else [args.device]
    batches = () if args.no_latency else _batch_sizes(args.batch_sizes)
    model, card = load_checkpoint(args.path)
    prof = profile_checkpoint(
        args.path, model, card, batch_sizes=batches, devices=devices, threads=args.threads,
        warmup=args.warmup, repeats=args.repeats, channels_last=args.channels_last,
    )  # fmt: skip
    semi: dict[str, Any] | None = None
    if nm_layers(model):  # 2:4 masks: torch's semi-structured kernels, where a GPU has them
        why = semi_structured_support()
        if why is not None or not batches or args.device == "cpu":
            semi = {"skipped": why or "no latency measured on CUDA (--no-latency / --device cpu)"}
        else:
            from advprune.sparsity.nm import semi_structured_latency

            shape = tuple(card.get("input_shape") or model.spec.input_size)
            semi = semi_structured_latency(model, shape, batches, repeats=args.repeats)
    data = {"checkpoint": str(args.path), "summary": prof.summary(), "profile": prof.to_dict()}
    if semi is not None:
        data["semi_structured"] = semi
    if args.out:
        write_json_atomic(args.out, data)
    if args.as_json:
        _print_json(data)
        return 0
    print(f"checkpoint {args.path} ({model.spec.name}, input {list(prof.input_size)})")
    print(prof.format_layers())
    print(prof.format())
    if semi is not None:
        print(_semi_text(semi))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _semi_text(semi: dict[str, Any]) -> str:
    if "skipped" in semi:
        return f"2:4 semi-structured kernels: skipped, {semi['skipped']}"
    rows = [f"2:4 semi-structured linear layers on {semi['device']} (fp16, dense vs 2:4):"]
    for r in semi["layers"]:
        rows.append(
            f"  {r['layer']} {r['out']}x{r['in']} batch {r['batch_size']}: {r['dense_ms']:.4f} / "
            f"{r['semi_structured_ms']:.4f} ms, {r['speedup']:.2f}x"
        )
    rows += [f"  not converted: {name}: {why}" for name, why in semi["skipped"].items()]
    return "\n".join(rows)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from advprune.quickstart import format_table, run_quickstart

    t0 = time.perf_counter()
    rows = run_quickstart(args.out, seed=args.seed, progress=args.progress, device=args.device)
    print(format_table(rows))
    print(f"wrote {Path(args.out) / 'results.json'} in {time.perf_counter() - t0:.0f} s")
    return 0


COMMANDS = {
    "train": cmd_train,
    "prune": cmd_prune,
    "finetune": cmd_finetune,
    "eval": cmd_eval,
    "info": cmd_info,
    "methods": cmd_methods,
    "export": cmd_export,
    "compact": cmd_compact,
    "profile": cmd_profile,
    "quickstart": cmd_quickstart,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``advprune``; returns the exit status."""
    from advprune.registry import load_plugins

    try:  # plug-in modules named in $ADVPRUNE_PLUGINS register before the parser reads them
        load_plugins()
    except AdvpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (one line, see _Parser), --help or --version
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        return EXIT_USAGE
    try:
        func = getattr(args, "func", None) or COMMANDS[args.command]
        with process_default(getattr(args, "progress", None)):  # --progress reaches every loop
            return func(args)
    except AdvpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as exc:  # training diverged (e.g. a learning rate far too high)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`)
        import os

        # stdout is gone: point it at /dev/null so the exit flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
