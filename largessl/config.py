"""One typed configuration tree, loaded from YAML files and dotted command-line overrides.

Precedence: command line > files (later files and children over their ``base``) > dataclass defaults.
Every key is checked against the dataclass tree before any work starts: unknown keys, wrong types and
impossible combinations raise ``ValueError`` naming the key, where it came from and what is allowed.
Derived values (per-rank batch, scaled lr, number of steps) are computed once by :func:`plan_run`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from largessl.data.config import DataConfig
from largessl.distributed.config import DistConfig
from largessl.eval.config import EvalConfig
from largessl.hub.config import HubConfig
from largessl.methods.base import METHODS, MethodConfig
from largessl.models.config import ModelConfig
from largessl.train.config import CheckpointConfig, LogConfig, OptimConfig, TrainConfig

log = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-9`` as a float (YAML 1.1 wants ``1.0e-9``; users write both)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass

STAGES = ("linear", "knn", "finetune", "push")
EVAL_STAGES = ("linear", "knn", "finetune")
"""Stages that run ``largessl eval <stage>`` on every rank of the stage job (the others run on one process); they
need labelled train and val manifests."""
DEFAULTS = "defaults"
CLI = "command line"


@dataclass
class StageConfig:
    """Resources of one downstream stage's job (``largessl launch slurm|k8s``; ignored in-process)."""

    nodes: int = 1
    """Nodes of the stage's job."""
    gpus_per_node: int | None = None
    """GPUs per node, one process each; null = as many as the pretraining job's nodes (--gpus-per-node)."""
    time: str = ""
    """SLURM time limit of each run of the job (minutes, H:MM:SS, D-HH:MM:SS); "" = the pretraining job's.
    A stage that runs out is requeued and resumes from its checkpoint."""

    def validate(self, name: str) -> None:
        """Check the values."""
        if self.nodes < 1:
            raise ValueError(f"stages.{name}.nodes must be >= 1 (got {self.nodes})")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ValueError(f"stages.{name}.gpus_per_node must be >= 0 or null (got {self.gpus_per_node})")
        if self.time and not re.fullmatch(r"\s*(?:\d+-)?\d+(?::\d+){0,2}\s*", self.time):
            raise ValueError(f"stages.{name}.time={self.time!r} is not a SLURM time; use minutes (90), H:MM:SS or "
                             "D-HH:MM:SS")


@dataclass
class Config:
    """The whole run: one section per package, plus the downstream stages."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone."""
    method: MethodConfig = field(default_factory=lambda: METHODS.extra("barlow_twins", "config")())
    """SSL method; `method.name` selects the method and which other `method.*` keys exist."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and augmentation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and lr schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, batch, precision."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group and wrapping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and location."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Linear / kNN / online-probe protocol."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging and metric sinks."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Where the `push` stage publishes."""
    stages: list[str] | dict[str, StageConfig] = field(default_factory=list)
    """Downstream stages run after pretraining completes, in order: linear, knn, finetune, push. A list of names,
    or a mapping name -> {nodes, gpus_per_node, time} giving each stage's job its resources (default 1 node x
    all GPUs of a pretraining node)."""

    def stage_config(self, name: str) -> StageConfig:
        """The resources of stage ``name`` (defaults when ``stages`` is a list)."""
        if isinstance(self.stages, dict):
            return self.stages.get(name) or StageConfig()
        return StageConfig()

    def validate(self) -> None:
        """Cross-section checks; each section's own ``validate`` runs first."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                try:
                    section.validate()
                except ValueError as e:
                    raise ValueError(f"invalid config: {e}") from None
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"invalid config: unknown stage(s) {bad} in 'stages'; allowed: {', '.join(STAGES)}")
        if isinstance(self.stages, dict):
            for name, sc in self.stages.items():
                try:
                    sc.validate(name)
                except ValueError as e:
                    raise ValueError(f"invalid config: {e}") from None
        if self.model.arch.startswith("timm/"):
            # resolved once here and saved with the run: the hub and exports rebuild the ViT's patch grid from it
            if self.model.image_size == 0:
                self.model.image_size = self.data.image_size
            elif self.model.image_size != self.data.image_size:
                raise ValueError(f"invalid config: model.image_size={self.model.image_size} but data.image_size="
                                 f"{self.data.image_size}; a ViT's patch grid and position embedding are built for "
                                 "model.image_size: set both to the same value (or leave model.image_size at 0)")
        if self.dist.strategy == "deepspeed" and self.train.compile:
            raise ValueError("invalid config: train.compile=true is not supported with dist.strategy=deepspeed")
        views_needed = getattr(self.method, "num_views", None)
        if views_needed is not None and views_needed != self.data.num_views:
            raise ValueError(
                f"invalid config: method.num_views={views_needed} but data.num_views={self.data.num_views}; "
                "set both to the same M"
            )


# ---------------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(dst: dict[str, Any], src: dict[str, Any], source: str, prov: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``src`` into ``dst``, recording where each leaf key came from."""
    for k, v in src.items():
        if not isinstance(k, str):
            raise ValueError(f"config key {prefix}{k!r} in {source} must be a string")
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, source, prov, key + ".")
        else:
            dst[k] = v
            if isinstance(v, dict):
                for sub in _leaves(v, key + "."):
                    prov[sub] = source
            prov[key] = source


def _leaves(d: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out.extend(_leaves(v, f"{prefix}{k}."))
    return out


def _load_file(path: Path, prov: dict[str, str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A file's mapping with its ``base:`` chain (relative to the file) merged underneath."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config files include each other in a cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for b in bases:
        _merge(merged, _load_file(path.parent / b, prov, seen + (path,)), str(path.parent / b), {})
    _merge(merged, data, _display(path), {})
    # provenance: re-walk so the innermost file that set a key is named
    for key in _leaves(data, ""):
        prov[key] = _display(path)
    return merged


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=0.3'`` → ``('optim.lr', 0.3)``; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. optim.base_lr=0.3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = _yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def load_config(files: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
                overrides: list[str] | None = None) -> Config:
    """Build and validate a :class:`Config` from YAML ``files`` and ``key=value`` ``overrides``."""
    if files is None:
        files = []
    elif isinstance(files, (str, os.PathLike)):
        files = [files]
    prov: dict[str, str] = {}
    merged: dict[str, Any] = {}
    for f in files:
        file_prov: dict[str, str] = {}
        _merge(merged, _load_file(Path(f), file_prov), _display(Path(f)), {})
        prov.update(file_prov)
    for text in overrides or []:
        key, value = parse_override(text)
        _merge(merged, _nest(key, value), CLI, {})
        prov[key] = CLI
        for sub in _leaves(value, key + ".") if isinstance(value, dict) else []:
            prov[sub] = CLI
    cfg = config_from_dict(merged, prov)
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any], prov: dict[str, str] | None = None) -> Config:
    """Strictly convert a nested mapping into a :class:`Config` (unknown keys and wrong types raise)."""
    prov = prov or {}
    data = dict(data)
    method_data = data.pop("method", {}) or {}
    if not isinstance(method_data, dict):
        raise ValueError(f"config key 'method' ({prov.get('method', DEFAULTS)}) must be a mapping")
    cfg = _build(Config, {k: v for k, v in data.items()}, "", prov, skip={"method"})
    method_name = method_data.get("name", "barlow_twins")
    if not isinstance(method_name, str) or method_name not in METHODS:
        raise ValueError(
            f"config key 'method.name' ({prov.get('method.name', DEFAULTS)}): unknown method {method_name!r}; "
            f"allowed: {', '.join(METHODS.names())}"
        )
    cfg.method = _build(METHODS.extra(method_name, "config"), method_data, "method.", prov)
    return cfg


def _build(cls: type, data: dict[str, Any], prefix: str, prov: dict[str, str], skip: set[str] = frozenset()) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            raise ValueError(
                f"unknown config key {full!r} ({prov.get(full, DEFAULTS)}); valid keys"
                f"{' in ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(sorted(names - skip))}"
            )
        if key in skip:
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config key {full!r} ({prov.get(full, DEFAULTS)}) must be a mapping of its fields")
            kwargs[key] = _build(tp, value, full + ".", prov)
        else:
            kwargs[key] = _coerce(value, tp, full, prov.get(full, DEFAULTS))
    return cls(**kwargs)


class _OneSource(dict):  # type: ignore[type-arg]
    """Provenance of every key of a value that came from one place."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def get(self, key: Any, default: Any = None) -> Any:
        return self.source


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp`` (ints widen to floats; nothing else is converted)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"config key {key!r} ({source})"
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ValueError as e:
                # a mapping given for a mapping alternative: its own error (e.g. an unknown key) is the useful one
                if isinstance(value, dict) and typing.get_origin(a) is dict:
                    raise
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} matches none of {', '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        if dataclasses.is_dataclass(inner):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ValueError(f"{where}: keys must be strings, got {k!r}")
                if v is None:
                    v = {}
                if not isinstance(v, dict):
                    raise ValueError(f"config key '{key}.{k}' ({source}) must be a mapping of its fields, got {v!r}")
                out[k] = _build(inner, v, f"{key}.{k}.", _OneSource(source))
            return out
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"config annotation {tp!r} of {key} is not supported by the loader")


# ---------------------------------------------------------------------------------------------------
# Serialisation


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (dataclasses → dicts, tuples → lists), ``method.name`` included."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out = {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            return out
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text, loadable again with :func:`load_config`."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(config_to_yaml(cfg))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# The run directory


SCHEDULER_VARIABLES = ("SLURM_JOB_ID", "JOB_COMPLETION_INDEX", "TORCHELASTIC_RUN_ID", "LARGESSL_WORLD_SIZE")
"""Set by a scheduler that restarts the same command (SLURM requeue, a Kubernetes pod replacement, torchrun's
restarts): such a job must name its run directory, or every restart would start a new run."""


def unique_run_dir(cfg: Config, now: float | None = None) -> str:
    """``runs/<method>-<arch>-<UTC yyyymmdd-HHMMSS>-<6 hex>``: a new run directory that no other run uses."""
    import secrets
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"runs/{cfg.method.name}-{cfg.model.arch}-{stamp}-{secrets.token_hex(3)}"


def resolve_run_dir(cfg: Config, environ: dict[str, str] | None = None, world_size: int = 1) -> str:
    """``train.run_dir``, or a new unique one for a single process started by hand; ``ValueError`` for a job a
    scheduler may restart (it must find its run again)."""
    if cfg.train.run_dir:
        return cfg.train.run_dir
    env = os.environ if environ is None else environ
    scheduled = [v for v in SCHEDULER_VARIABLES if v in env]
    if world_size > 1 or scheduled:
        why = f"{world_size} ranks" if world_size > 1 else f"{scheduled[0]} is set"
        raise ValueError(f"train.run_dir is empty and this job may be restarted by its scheduler ({why}): a restart "
                         "must find the same run directory to resume, so name it, e.g. train.run_dir=runs/bt-r50 "
                         "(`largessl launch slurm|k8s` derive one at submit time)")
    return unique_run_dir(cfg)


# ---------------------------------------------------------------------------------------------------
# Derived values


@dataclass(frozen=True)
class RunPlan:
    """Values derived once from the config, the world size and the dataset size."""

    world_size: int
    per_rank_batch_size: int
    global_batch_size: int
    steps_per_epoch: int
    num_steps: int
    warmup_steps: int
    lr: float
    bias_norm_lr: float


def plan_run(cfg: Config, world_size: int, num_train_samples: int, steps_per_epoch: int | None = None) -> RunPlan:
    """Derive per-rank batch, step counts and scaled lrs; impossible combinations raise ``ValueError``.

    ``steps_per_epoch`` is what the data stream really yields per rank when known (it may be lower than
    samples // batch when shards are uneven); the schedule follows it.
    """
    gbs = cfg.train.global_batch_size
    if world_size < 1:
        raise ValueError(f"world size must be >= 1 (got {world_size})")
    if gbs % world_size:
        raise ValueError(
            f"train.global_batch_size={gbs} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    if num_train_samples < gbs:
        raise ValueError(
            f"the training set has {num_train_samples} samples, fewer than train.global_batch_size={gbs}; "
            "lower the batch size or use more data"
        )
    if steps_per_epoch is None:
        steps_per_epoch = num_train_samples // gbs
    if steps_per_epoch < 1:
        raise ValueError("the training stream yields no full batch per epoch; lower train.global_batch_size")
    num_steps = cfg.train.num_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup_steps = min(num_steps, round(cfg.optim.warmup_epochs * steps_per_epoch))
    scale = gbs / 256 if cfg.optim.scale_lr else 1.0
    bn_base = cfg.optim.bias_norm_lr or cfg.optim.base_lr
    plan = RunPlan(
        world_size=world_size,
        per_rank_batch_size=gbs // world_size,
        global_batch_size=gbs,
        steps_per_epoch=steps_per_epoch,
        num_steps=num_steps,
        warmup_steps=warmup_steps,
        lr=cfg.optim.base_lr * scale,
        bias_norm_lr=bn_base * scale,
    )
    check = getattr(cfg.method, "check_plan", None)
    if check is not None:
        try:
            check(plan.global_batch_size, plan.per_rank_batch_size)
        except ValueError as e:
            raise ValueError(f"invalid config: {e}") from None
    return plan
