"""``evaluate(model, data, ...) -> Report``: the evaluation protocol, resumable per batch.

Order of work: validate every setting and the data (inputs in [0, 1], non-empty), run a clean
pass over the evaluation set that also validates the model's outputs, measures input
gradients and checks determinism, and only then run attacks. Each attack runs batch by batch;
every finished batch is written atomically to ``OUT/batches/`` and each batch's attack is
seeded from ``(seed, attack, batch index)``, so a killed run, rerun with the same command,
continues where it stopped and ends with the same numbers as an uninterrupted run. A folder
holding a run with other settings (or another model, or other data) is refused.
"""

from __future__ import annotations

import hashlib
import platform
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advprune._validation import check_eps, check_norm, check_unit_range
from advprune.attacks.pgd import check_steps, model_mode_scope
from advprune.distributed import DistContext
from advprune.errors import ConfigError, DataError, UnknownNameError
from advprune.evaluation.attacks import (
    ATTACKS,
    DEFAULT_ATTACKS,
    EvalAttack,
    _HOFMNAttack,
    attack_names,
    create_attack,
)
from advprune.evaluation.autoattack import AA_VERSIONS
from advprune.evaluation.checks import (
    SQUARE_THRESHOLD,
    forward_checks,
    merge_probe,
    model_flags,
    probe_flags,
    probe_runs,
)
from advprune.evaluation.curve import default_eps_grid, plot_security_curve, security_curve
from advprune.evaluation.forward import attack_view, full_fp32, use_channels_last
from advprune.evaluation.report import (
    REPORT_FILE,
    SAMPLES_FILE,
    Entry,
    Flag,
    Report,
    load_samples,
    save_samples,
)
from advprune.evaluation.shards import auto_batch_size, eval_devices, shard_of, spawn_evaluate
from advprune.io import check_same_settings, read_json_record, write_json_atomic
from advprune.progress import ProgressSetting, resolve
from advprune.progress import progress as progress_of

__all__ = ["ATTACK_NAMES", "DEFAULT_ATTACKS", "evaluate", "parse_attacks"]

ATTACK_NAMES: tuple[str, ...] = attack_names()  # the shipped ones; attack_names() is current

RUN_FILE = "eval_run.json"
CURVE_FILE = "security_curve"  # .png and .svg
STUDY_FILE = _HOFMNAttack.STUDY_FILE
TUNED_FILE = _HOFMNAttack.TUNED_FILE


def parse_attacks(attacks: str | Sequence[str]) -> tuple[str, ...]:
    """``"autoattack,hofmn"`` or a sequence -> validated, de-duplicated names in order."""
    items = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name not in attack_names():
            raise UnknownNameError("attack", name, attack_names())
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"no attack given; valid attacks: {', '.join(attack_names())}")
    return tuple(names)


def _positive(name: str, value: Any) -> int:
    return check_steps(value, name)


# ------------------------------------------------------------------------------ data


@dataclass
class _EvalData:
    x: Tensor  # (n, ...) on CPU, in [0, 1]
    y: Tensor  # (n,) int64
    tune: Any  # dataset or (x, y) used by HO-FMN, or None
    name: str | None
    num_classes: int | None


def _stack(dataset: Any, n: int | None, batch_size: int) -> tuple[Tensor, Tensor]:
    total = len(dataset)
    count = total if n is None else min(n, total)
    if count == 0:
        raise ConfigError("the evaluation set is empty")
    xs, ys = [], []
    for lo in range(0, count, batch_size):
        items = [dataset[i] for i in range(lo, min(lo + batch_size, count))]
        x = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
        check_unit_range(x, "evaluation inputs")
        xs.append(x)
        ys.append(torch.as_tensor([int(it[1]) for it in items], dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _eval_data(data: Any, tune_data: Any, n: int | None, batch_size: int) -> _EvalData:
    from advprune.data import DataSplits, load_dataset

    if isinstance(data, str):
        data = load_dataset(data)
    if isinstance(data, DataSplits):
        x, y = _stack(data.test, n, batch_size)
        tune = tune_data if tune_data is not None else data.train
        return _EvalData(x, y, tune, data.info.name, data.info.num_classes)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if x.shape[0] == 0:
            raise ConfigError("the evaluation set is empty")
        if n is not None:
            x, y = x[:n], y[:n]
        y = torch.as_tensor(y, dtype=torch.long)
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        check_unit_range(x, "evaluation inputs")
        return _EvalData(x.detach().float().cpu(), y.cpu(), tune_data, None, None)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        x, y = _stack(data, n, batch_size)
        return _EvalData(x, y, tune_data, None, None)
    raise ConfigError(
        f"data must be a dataset name, DataSplits, a dataset or an (x, y) pair of tensors, "
        f"not {type(data).__name__}"
    )


# ------------------------------------------------------------------------------ helpers


def _batch_seed(seed: int, name: str, batch: int) -> int:
    """A seed for batch ``batch`` of attack ``name`` that depends on nothing else."""
    crc = zlib.crc32(name.encode())
    return int(np.random.SeedSequence([seed, crc, batch]).generate_state(1)[0])


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tensor_sha256(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import matplotlib
    import optuna
    import pyautoattack

    from advprune._version import __version__

    return {
        "advprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyautoattack": getattr(pyautoattack, "__version__", "unknown"),
        "optuna": optuna.__version__,
        "matplotlib": matplotlib.__version__,
    }


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _first(item: tuple[Any, ...]) -> Any:
    return item[0]


# ------------------------------------------------------------------------------ the run


def _check_same_run(out: Path, record: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if not path.exists() and ((out / "batches").exists() or (out / STUDY_FILE).exists()):
        raise ConfigError(
            f"{out} holds evaluation results without {RUN_FILE}; pass a new --out folder"
        )
    before = read_json_record(path, what="evaluation settings", hint="pass a new --out folder")
    check_same_settings(out, before, record, what="an evaluation")


def _run_attack(
    attack: EvalAttack,
    model: nn.Module,
    data: _EvalData,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    out: Path | None,
    progress: ProgressSetting,
    after_batch: Callable[[str, int], None] | None,
    dist: DistContext,
) -> tuple[dict[str, np.ndarray], float]:
    """Run ``attack`` on this process's batches (all of them in one process), gather every
    process's batches and merge them in batch order (the same arrays for any process count)."""
    n = data.x.shape[0]
    parts: list[tuple[int, dict[str, np.ndarray]]] = []
    starts = list(range(0, n, batch_size))
    mine = shard_of(len(starts), dist)
    devices = [device] if device.type == "cuda" else []
    bar = progress_of(mine, desc=attack.name, unit="batch", leave=True, mode=progress)
    for b in bar:
        lo = starts[b]
        hi = min(lo + batch_size, n)
        path = out / "batches" / f"{attack.name}_{b:05d}.npz" if out is not None else None
        if path is not None and path.exists():
            arrays = load_samples(path)
        else:
            x, y = data.x[lo:hi].to(device), data.y[lo:hi].to(device)
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=devices):
                arrays = attack.run_batch(model, x, y, _batch_seed(seed, attack.name, b))
            arrays["seconds"] = np.asarray(time.perf_counter() - t0)
            if path is not None:
                save_samples(path, arrays)
        parts.append((b, arrays))
        if after_batch is not None:
            after_batch(attack.name, b)
    everyone = sorted(
        (part for shard in dist.all_gather_object(parts) for part in shard), key=_first
    )
    seconds = sum(float(arrays["seconds"]) for _, arrays in everyone)
    batches = [{k: v for k, v in arrays.items() if k != "seconds"} for _, arrays in everyone]
    merged: dict[str, np.ndarray] = {}
    for key in batches[0]:
        if batches[0][key].ndim == 0 or key == "warnings":
            values = sorted({str(v) for p in batches for v in np.atleast_1d(p[key])})
            merged[key] = np.asarray(values, dtype=str)
        else:
            merged[key] = np.concatenate([p[key] for p in batches])
    return merged, seconds


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    eps: str | float,
    norm: str = "linf",
    attacks: str | Sequence[str] = DEFAULT_ATTACKS,
    n: int | None = None,
    batch_size: int | str = 128,
    seed: int = 0,
    aa_version: str = "standard",
    pgd_steps: int = 20,
    fmn_steps: int = 200,
    hofmn_trials: int = 32,
    hofmn_tune_steps: int = 100,
    hofmn_tune_batch: int = 64,
    check_n: int = 256,
    probe_steps: int = 50,
    curve_points: int = 101,
    eps_grid: str | Sequence[str | float] | None = None,
    tune_data: Any = None,
    out: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: ProgressSetting = False,
    model_info: dict[str, Any] | None = None,
    after_batch: Callable[[str, int], None] | None = None,
    attack_options: dict[str, dict[str, Any]] | None = None,
    devices: int | str | Sequence[str | torch.device] | None = None,
    hofmn_cache: str | Path | bool | None = None,
    compile: bool = False,
    channels_last: bool | None = None,
) -> Report:
    """Evaluate the robustness of ``model`` (any ``nn.Module`` on inputs in [0, 1]).

    Args:
        model: classifier returning logits (N, classes); evaluated in eval mode (restored).
        data: a dataset name (``"digits"``), a :class:`~advprune.data.DataSplits` (its test
            split is evaluated, its train split tunes HO-FMN), a dataset of ``(x, label)``
            pairs, or an ``(x, y)`` pair of tensors.
        eps: radius in input units, exact fractions accepted (``"8/255"``); > 0.
        norm: ``"linf"`` or ``"l2"``.
        attacks: names, in order (see :data:`ATTACK_NAMES`): ``autoattack`` (the
            ``aa_version``), ``hofmn`` (tuned FMN), ``fmn`` (FMN with default settings),
            ``pgd`` (``pgd_steps`` steps), or one AutoAttack attack alone (``apgd-ce``,
            ``apgd-t``, ``fab-t``, ``square``, ``apgd-dlr``, ``fab``).
        n: evaluate the first ``n`` samples only (default: all).
        batch_size: samples per attack batch (and per saved progress file); part of the
            protocol: batch ``b``'s attacks are seeded from ``(seed, attack, b)`` and draw
            their random starts for the whole batch, so another batch size gives other
            (equally valid) random draws. ``"auto"``: the largest that fits on a GPU (128
            times a power of two, at most 4096), 128 on a CPU; the size chosen is recorded
            (``report.settings["batch_size"]``) and a resumed run keeps it.
        seed: seeds every attack; batch ``b`` of attack ``a`` is seeded from ``(seed, a, b)``.
        aa_version: ``"standard"``, ``"plus"`` or ``"rand"``.
        fmn_steps: FMN / tuned-FMN steps on the evaluation set (HO-FMN: 200).
        hofmn_trials, hofmn_tune_steps, hofmn_tune_batch: HO-FMN tuning: trials, FMN steps per
            trial and the size of each trial's fresh batch from the tuning split.
        check_n, probe_steps: points and steps of the PGD probe of the failure checks.
        curve_points: points of the security-curve grid on [0, 2 eps] (eps itself included).
        eps_grid: the curve's grid instead (comma-separated text or a sequence; exact
            fractions such as ``"4/255"`` accepted; eps is added if missing).
        tune_data: tuning split for HO-FMN (a dataset or ``(x, y)``) when ``data`` has none.
        out: folder for ``report.json``, ``per_sample.npz``, ``security_curve.png/.svg``, the
            HO-FMN study and per-batch progress (resumable); ``None`` writes nothing.
        device: where to run (default: the model's device).
        progress: ``auto``, ``bar``, ``lines``, ``off`` (or True: the default mode; False:
            off), see :mod:`advprune.progress`: a bar or a line per attack.
        model_info: extra description of the model recorded in the report (e.g. checkpoint).
        after_batch: ``after_batch(attack, batch)`` after each batch is saved (for tests).
        attack_options: ``{attack: {option: value}}`` for any registered attack's typed
            options (:mod:`advprune.evaluation.attacks`), e.g. a plug-in attack's.
        devices: shard the evaluation over processes started here: a number (GPUs where
            CUDA is available, else CPU processes sharing the cores) or a list of devices.
            Under ``torchrun`` the process group it started is used instead. Batch ``b`` runs
            in process ``b % N``; the report and per-sample arrays are those of one process.
        hofmn_cache: folder of tuned HO-FMN configurations, keyed by the model's weights
            (sha256), the tuning data and the tuning settings, reused by later runs on the
            same model (the tuning is deterministic, so the result is the same). ``None``:
            ``$ADVPRUNE_CACHE/hofmn``, else ``~/.cache/advprune/hofmn``; ``False``: none.
        compile: run the attacks' forward passes without gradients (Square's queries, the
            re-checks) through ``torch.compile`` (see :mod:`advprune.evaluation.forward`);
            compiling costs seconds once per process, and on a 2-core CPU it cost more than it
            saved (``benchmarks/results/eval_throughput.md``): measure before relying on it.
        channels_last: attacks in channels-last memory format (``None``: on for CUDA).
            Both change kernels, not the protocol: they are recorded in the report and a
            resumed run may change them.

    Returns:
        The :class:`Report`; ``report.samples`` holds the per-sample arrays: ``index``,
        ``label``, ``clean_pred``, ``clean_correct``, ``robust`` (worst case) and per attack
        ``success_<name>`` (broken at eps) and ``distance_<name>`` (norm of the adversarial
        example found; minimum-norm attacks: the minimum distance, 0 where the clean
        prediction is wrong, ``inf`` where the attack failed). With a minimum-norm attack,
        ``distance_min`` is the per-sample minimum over every attack's distance, and the
        security curve (``report.curve``) is computed from it.
    """
    call = {k: v for k, v in locals().items() if k not in ("model", "data")}
    dist = DistContext.from_env()
    if devices is not None and not dist.distributed:
        targets = eval_devices(devices)
        if len(targets) > 1:
            return spawn_evaluate(evaluate, model, data, targets, call)
        device = device if device is not None else targets[0]
    # ---- settings (all validated before any data is read or attack runs)
    progress = resolve(progress) if dist.is_main else False
    norm = check_norm(norm)
    eps_value = check_eps(eps, norm)
    if eps_value <= 0:
        raise ConfigError(f"eps must be > 0 for an evaluation, got {eps!r}")
    names = parse_attacks(attacks)
    if aa_version not in AA_VERSIONS:
        raise UnknownNameError("AutoAttack version", str(aa_version), AA_VERSIONS)
    if n is not None:
        n = _positive("n", n)
    auto_batch = isinstance(batch_size, str) and batch_size.strip().lower() == "auto"
    batch_size = 128 if auto_batch else _positive("batch_size", batch_size)
    for key, value in (
        ("pgd_steps", pgd_steps), ("fmn_steps", fmn_steps), ("hofmn_trials", hofmn_trials),
        ("hofmn_tune_steps", hofmn_tune_steps), ("hofmn_tune_batch", hofmn_tune_batch),
        ("check_n", check_n), ("probe_steps", probe_steps), ("curve_points", curve_points),
    ):  # fmt: skip
        _positive(key, value)
    grid = _eps_grid(eps_grid, eps_value, norm, curve_points)
    eps_text = str(eps).strip() if isinstance(eps, str) else repr(eps_value)
    settings = {
        "attacks": list(names), "eps": eps_text, "eps_value": eps_value, "norm": norm, "n": n,
        "batch_size": batch_size, "seed": int(seed), "aa_version": aa_version,
        "pgd_steps": pgd_steps, "fmn_steps": fmn_steps, "hofmn_trials": hofmn_trials,
        "hofmn_tune_steps": hofmn_tune_steps, "hofmn_tune_batch": hofmn_tune_batch,
        "check_n": check_n, "probe_steps": probe_steps, "curve_points": curve_points,
        "eps_grid": None if eps_grid is None else grid.tolist(),
    }  # fmt: skip
    if attack_options:  # recorded only when given (the shipped attacks read the keys above)
        settings["attack_options"] = {k: dict(v) for k, v in attack_options.items()}
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device)
    out_path = Path(out) if out is not None else None

    # ---- data
    ev = _eval_data(data, tune_data, n, batch_size)
    if auto_batch:
        settings["batch_size"] = batch_size = _auto_batch(model, ev, device, out_path, dist)
    if "hofmn" in names and ev.tune is None:
        raise ConfigError(
            "HO-FMN needs a tuning split apart from the evaluation points: pass a DataSplits or "
            "dataset name as data, or tune_data="
        )
    for name in names:  # every attack's options, before any attack runs
        cls = ATTACKS.get(name)
        opts = {k: settings[key] for k, key in cls.settings_keys.items() if key in settings}
        create_attack(name, eps_value, norm, {**opts, **(attack_options or {}).get(name, {})})
    total = ev.x.shape[0]

    record = {
        "settings": settings,
        "model_sha256": _state_sha256(model),
        "data": {"name": ev.name, "n": total, "sha256": _tensor_sha256(ev.x, ev.y)},
    }
    if out_path is not None:
        _check_same_run(out_path, record)

    # eval mode, and float32 kernels in full precision (no TF32 convolutions on a GPU)
    with model_mode_scope(model, "eval"), full_fp32():
        # ---- clean pass: output shape, labels, gradients, determinism (before any attack)
        clean = []
        starts = list(range(0, total, batch_size))
        for b in progress_of(shard_of(len(starts), dist), desc="clean", mode=progress):
            x = ev.x[starts[b] : starts[b] + batch_size].to(device)
            y = ev.y[starts[b] : starts[b] + batch_size].to(device)
            bc = forward_checks(model, x, y, ev.num_classes)
            clean.append((b, _np(bc.logits.argmax(1)), _np(bc.grad_norm), bc.output_change))
        clean = sorted((c for shard in dist.all_gather_object(clean) for c in shard), key=_first)
        clean_pred = np.concatenate([c[1] for c in clean])
        grad_norms = [c[2] for c in clean]
        change = max(c[3] for c in clean)
        labels = _np(ev.y)
        correct = clean_pred == labels

        if out_path is not None and dist.is_main:
            write_json_atomic(out_path / RUN_FILE, record)
        dist.barrier()  # no batch file is written before the settings record

        # the attacks (and the probe) run on the model, or its compiled / channels-last view
        runtime = {
            "compile": bool(compile),
            "channels_last": use_channels_last(channels_last, device),
        }
        attacked = attack_view(model, **runtime)

        # ---- failure-check probe (deterministic: PGD from x); its runs shared out
        k = min(check_n, total)
        x_probe, y_probe = ev.x[:k].to(device), ev.y[:k].to(device)
        probe_part = probe_runs(
            attacked, x_probe, y_probe, eps=eps_value, norm=norm, steps=probe_steps,
            rank=dist.rank, world=dist.world_size,
        )  # fmt: skip

        # ---- attacks
        samples: dict[str, np.ndarray] = {
            "index": np.arange(total),
            "label": labels,
            "clean_pred": clean_pred,
            "clean_correct": correct,
        }
        entries: list[Entry] = []
        for name in names:
            entry, arrays = _run_named(
                name, attacked, ev, settings, device=device, out=out_path, progress=progress,
                correct=correct, after_batch=after_batch, dist=dist,
                cache=_cache_folder(hofmn_cache), model_sha256=record["model_sha256"],
            )  # fmt: skip
            entries.append(entry)
            samples.update(arrays)
        runs = {i: r for part in dist.all_gather_object(probe_part) for i, r in part.items()}
        probe = merge_probe(runs, x_probe, eps=eps_value, norm=norm, n=k)
        flags = model_flags(np.concatenate(grad_norms), change) + probe_flags(probe)

    # ---- aggregate
    broken = np.zeros(total, dtype=bool)
    for name in names:
        broken |= samples[f"success_{name}"]
    robust = correct & ~broken
    flags += _square_flags(names, samples)
    samples["robust"] = robust
    curve = None
    if any(ATTACKS.get(m).min_norm for m in names):
        # each sample's distance is the smallest adversarial perturbation ANY attack found
        # (every attack's example is evidence): a minimum-norm attack that is weaker than
        # AutoAttack at eps cannot make the curve claim more robustness than AutoAttack does
        samples["distance_min"] = np.min(
            np.stack([samples[f"distance_{name}"] for name in names]), axis=0
        )
        acc = security_curve(samples["distance_min"], grid)
        curve = {
            "attack": "min",
            "from": list(names),
            "eps": grid.tolist(),
            "robust_accuracy": acc.tolist(),
            "robust_accuracy_at_eps": float(acc[grid == eps_value][0]),
        }
    info = {"class": type(model).__name__, "state_sha256": record["model_sha256"]}
    info.update(model_info or {})
    report = Report(
        n=total,
        clean_accuracy=float(correct.mean()),
        robust_accuracy=float(robust.mean()),
        eps=eps_text,
        eps_value=eps_value,
        norm=norm,
        entries=entries,
        flags=flags,
        curve=curve,
        dataset=ev.name,
        model=info,
        settings={
            **settings,
            "batch_size_choice": "auto" if auto_batch else "given",
            "processes": dist.world_size,
            **runtime,
            "fp32_precision": "ieee",  # full_fp32: no TF32 kernels
            "probe": {"eps": probe.eps, "robust_accuracy": probe.robust_accuracy},
        },
        versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        samples=samples,
    )
    if out_path is not None and dist.is_main:
        _write_outputs(report, out_path, names)
    return report


def _auto_batch(
    model: nn.Module, ev: _EvalData, device: torch.device, out: Path | None, dist: DistContext
) -> int:
    """``batch_size="auto"``: the size a run in ``out`` already recorded (a resumed run keeps
    its batches and seeds), else :func:`auto_batch_size` on rank 0, the same in every process."""
    if out is not None and (out / RUN_FILE).exists():
        before = read_json_record(out / RUN_FILE, what="evaluation settings",
                                  hint="pass a new --out folder")  # fmt: skip
        recorded = before.get("settings") if isinstance(before, dict) else None
        size = recorded.get("batch_size") if isinstance(recorded, dict) else None
        if isinstance(size, int) and size > 0:
            return size
    size = None
    if dist.is_main:
        with model_mode_scope(model, "eval"):
            size = auto_batch_size(model, ev.x[0], device)
    return int(dist.broadcast_object(size))


def _cache_folder(setting: str | Path | bool | None) -> Path | None:
    """The HO-FMN cache folder of ``hofmn_cache`` (see :func:`evaluate`)."""
    import os

    if setting is False:
        return None
    if setting is None or setting is True:
        root = os.environ.get("ADVPRUNE_CACHE")
        return Path(root) / "hofmn" if root else Path.home() / ".cache" / "advprune" / "hofmn"
    return Path(setting)


def _eps_grid(
    text: str | Sequence[str | float] | None, eps_value: float, norm: str, points: int
) -> np.ndarray:
    """The security curve's grid: ``text`` (comma-separated or a sequence, each value checked
    like eps) with eps added, sorted; default: ``points`` values on [0, 2 eps]."""
    if text is None:
        return default_eps_grid(eps_value, points)
    items = text.split(",") if isinstance(text, str) else list(text)
    values = [check_eps(str(v).strip(), norm, "eps_grid value") for v in items if str(v).strip()]
    if not values:
        raise ConfigError("eps_grid is empty; give values such as 0,4/255,8/255,16/255")
    return np.unique(np.asarray([*values, eps_value], dtype=np.float64))


def _run_named(
    name: str,
    model: nn.Module,
    ev: _EvalData,
    settings: dict[str, Any],
    *,
    device: torch.device,
    out: Path | None,
    progress: ProgressSetting,
    correct: np.ndarray,
    after_batch: Callable[[str, int], None] | None,
    dist: DistContext,
    cache: Path | None,
    model_sha256: str,
) -> tuple[Entry, dict[str, np.ndarray]]:
    """Run attack ``name`` over the evaluation set; its entry and per-sample arrays."""
    eps, norm = settings["eps_value"], settings["norm"]
    cls = ATTACKS.get(name)
    options = {k: settings[key] for k, key in cls.settings_keys.items() if key in settings}
    options.update((settings.get("attack_options") or {}).get(name, {}))
    attack = create_attack(name, eps, norm, options)
    attack.prepare(
        model,
        {"settings": settings, "tune": ev.tune, "out": out, "progress": progress,
         "device": device, "after_batch": after_batch, "dist": dist, "cache": cache,
         "model_sha256": model_sha256},
    )  # fmt: skip
    arrays, seconds = _run_attack(
        attack, model, ev, batch_size=settings["batch_size"], seed=settings["seed"],
        device=device, out=out, progress=progress, after_batch=after_batch, dist=dist,
    )  # fmt: skip
    success = arrays["success"] & correct
    distance = np.where(correct, arrays["distance"], 0.0)
    per_sample = {f"success_{name}": success, f"distance_{name}": distance}
    details: dict[str, Any] = {"broken": int(success.sum())}
    flags = attack.entry_details(arrays, correct, per_sample, details)
    if attack.min_norm:
        robust_acc = float((distance > eps).mean())
    else:
        robust_acc = float((correct & ~success).mean())
    entry = Entry(
        name=name,
        kind="empirical",
        config=attack.config(),
        seconds=seconds + attack.tuning_seconds,
        robust_accuracy=robust_acc,
        flags=flags,
        details=details,
    )
    return entry, per_sample


def _square_flags(names: Sequence[str], samples: dict[str, np.ndarray]) -> list[Flag]:
    """Square (black-box) breaking points that every white-box attack of the run left intact,
    whether Square ran inside AutoAttack (after its white-box attacks) or on its own."""
    n = samples["label"].size
    by_square = np.zeros(n, dtype=bool)
    by_whitebox = np.zeros(n, dtype=bool)
    whitebox_ran = False
    for name in names:
        if name == "autoattack":
            order = [str(a) for a in samples["autoattack_attacks"]]
            first = samples["autoattack_first_attack"]
            for k, attack in enumerate(order):
                if attack == "square":
                    by_square |= first == k
                else:
                    by_whitebox |= first == k
                    whitebox_ran = True
        elif name == "square":
            by_square |= samples["success_square"]
        else:  # pgd, fmn, hofmn and the white-box AutoAttack attacks run alone
            by_whitebox |= samples[f"success_{name}"]
            whitebox_ran = True
    if not whitebox_ran:
        return []
    extra = int((by_square & ~by_whitebox).sum())
    if extra <= SQUARE_THRESHOLD * n:
        return []
    return [
        Flag(
            "square_beats_whitebox",
            f"the black-box Square attack broke {extra} points that every white-box attack "
            "left intact (gradient masking?)",
            "square",
        )
    ]


def _write_outputs(report: Report, out: Path, names: Sequence[str]) -> None:
    """per_sample.npz, the curve plots and report.json (last: its presence means done)."""
    assert report.samples is not None
    save_samples(out / SAMPLES_FILE, report.samples)
    report.files = {"per_sample": SAMPLES_FILE}
    if "hofmn" in names:
        report.files.update(hofmn_config=TUNED_FILE)
        if (out / STUDY_FILE).exists():  # not when the tuned configuration came from the cache
            report.files.update(hofmn_study=STUDY_FILE)
    if report.curve is not None:
        plot_security_curve(
            [report],
            [report.model.get("name") or report.model.get("class", "model")],
            path=out / CURVE_FILE,
            title=f"{report.dataset or 'data'}: security curve ({'+'.join(report.curve['from'])})",
        )
        report.files.update(curve_png=f"{CURVE_FILE}.png", curve_svg=f"{CURVE_FILE}.svg")
    report.save(out / REPORT_FILE)
