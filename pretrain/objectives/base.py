"""The one interface every pretraining objective implements, and the registry that finds them."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from data.common import Registry


#: Attribute under which each tower is registered on an objective. The image tower keeps the name
#: ``backbone``, so the weights of image-only runs keep their parameter names.
TOWER_ATTRS = {"image": "backbone", "text": "text_tower", "audio": "audio_tower", "video": "video_tower"}


@dataclasses.dataclass
class PipelineSpec:
    """An objective written as a chain of modules, for pipeline parallelism (``parallel.pp``).

    ``loss(layers[-1](...layers[0](inputs(batch))), labels(batch))["loss"]`` must equal
    ``forward(batch)["loss"]``: the pipeline engine cuts ``layers`` into stages, feeds ``inputs``
    to the first stage and ``labels`` to the loss on the last one. Each layer takes what the one
    before returns (a tensor, or a tuple of tensors whose floating-point members all carry a
    gradient back: DeepSpeed sends a gradient for every float tensor that crosses a stage boundary).
    The layers share the objective's parameters (not copies) and together hold every trainable one.

    Attributes:
        layers: the chain.
        inputs: ``batch -> tensor or tuple``, what the first layer takes.
        labels: ``batch -> tensor or tuple``, what the loss takes besides the last layer's output.
        loss: ``(outputs, labels) -> {"loss": scalar, <metric>: scalar, ...}``.
        metrics: names of the scalars besides ``loss`` that ``loss`` returns; the engine averages
            them over micro-batches and data-parallel ranks and reports them on every stage.
    """

    layers: Sequence[nn.Module]
    inputs: Callable[[dict], Any]
    labels: Callable[[dict], Any]
    loss: Callable[[Any, Any], dict]
    metrics: tuple[str, ...] = ()


class PipelineUnsupportedError(ValueError):
    """An objective (with these settings) cannot be cut into pipeline stages; the message says why."""


class Objective(nn.Module):
    """One pretraining method on shared towers. Never calls backward().

    A subclass declares what it needs and the loop provides it, asking nothing else:

    * ``towers``: the encoders it trains, by tower name (``("image",)``, ``("image", "text")``);
      each is built from ``model.<tower>`` through the backbone registry and handed to
      ``__init__`` (a dict ``{tower: module}``, or the image tower alone for image-only objectives);
    * ``batch``: the batch schema it trains on (:mod:`pretrain.batches`: ``views``, ``pairs``);
    * for ``views``: ``view_recipe`` (see :func:`data.view_specs`), ``num_views``, ``multi_crop``
      and ``local_views``;
    * which labels it learns from: ``labelled_only`` (it trains on the class-balanced labelled
      subset of the train split that ``labels`` / ``label_seed`` pick, not on every image) and
      ``labelled_stream`` (every train image, plus a second stream of batches from that subset
      under ``batch["labelled"]``; an instance may set it from its config);
    * ``eval_split``: the split :meth:`evaluate` runs on (None: the objective does not evaluate).

    Then it implements :meth:`forward`, and where it needs them the hooks below (:meth:`evaluate`,
    :meth:`export_state`, :meth:`resolve_config`, ...).
    """

    towers: tuple[str, ...] = ("image",)
    batch: str = "views"
    view_recipe: str = "simclr"
    num_views: int = 2
    # multi-crop (SwAV): whether forward() takes small local views after the 2 global ones
    # (``batch["views"][2:]``), and how many the loader draws unless ``aug.local_views`` says otherwise
    multi_crop: bool = False
    local_views: int = 0
    # whether it pretrains representations without labels (False: it trains a classifier on labels
    # or on a teacher's predictions); error messages list the pretraining objectives first
    pretraining: bool = True
    labelled_only: bool = False
    labelled_stream: bool = False
    # the main stream of batches draws with seed + stream_seed_offset (a labelled stream with seed)
    stream_seed_offset: int = 0
    eval_split: str | None = None
    # whether forward() supports gradient caching (``grad_chunks``, :mod:`pretrain.gradcache`): a
    # contrastive loss over the batch, each tower's forward run through :meth:`encode_chunked`
    supports_grad_chunks: bool = False
    grad_chunks: int = 1  # set by the loop from the run's ``grad_chunks``
    # why the objective cannot run as pipeline stages (``parallel.pp > 1``); None: pipeline_spec() says how
    pipeline_refusal: str | None = "its forward is not written as a chain of stages (Objective.pipeline_spec)"

    def __init__(self, towers):
        super().__init__()
        if isinstance(towers, nn.Module):
            towers = {"image": towers}
        missing = [t for t in self.towers if t not in towers]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the towers {list(self.towers)}; missing {missing}")
        for name, module in towers.items():
            if name not in TOWER_ATTRS:
                raise ValueError(f"unknown tower '{name}'; valid towers: {', '.join(TOWER_ATTRS)}")
            setattr(self, TOWER_ATTRS[name], module)

    def encode_chunked(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)``, in ``grad_chunks`` chunks with gradient caching while training (the
        gradient is the one-pass gradient; activation memory is one chunk's)."""
        from ..gradcache import encode_in_chunks

        return encode_in_chunks(fn, x, self.grad_chunks if self.training else 1, self)

    def pipeline_spec(self) -> PipelineSpec:
        """The objective as a chain of stages for the pipeline engine (see :class:`PipelineSpec`).
        Raises :class:`PipelineUnsupportedError` with the reason where the objective, or its
        settings, cannot be cut (default: ``pipeline_refusal``)."""
        raise PipelineUnsupportedError(f"objective '{getattr(self, 'name', type(self).__name__)}' cannot run as "
                                       f"pipeline stages: {self.pipeline_refusal}")

    def tower(self, name: str) -> nn.Module:
        """The encoder of tower ``name`` (``image``, ``text``, ``audio``, ``video``)."""
        return getattr(self, TOWER_ATTRS[name])

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Return ``{"loss": scalar with grad, "<part>_loss": detached, ...}``."""
        raise NotImplementedError

    @classmethod
    def fixed_modules(cls, cfg: Any) -> dict[str, nn.Module]:
        """Modules the objective loads from disk and never trains (a distillation teacher), as
        keyword arguments of ``__init__``. The loop loads them before it initialises the towers,
        so a bad teacher fails before any work, and the towers' initial weights do not depend on
        what the objective does with them. Default: none."""
        return {}

    @classmethod
    def tower_options(cls, cfg: Any) -> dict[str, dict]:
        """What the objective's config fixes about its towers, ``{tower: {keyword: value}}`` (VATT's
        ``shared``: one transformer for every modality); passed like the data's sizes, to a
        tower's factory when it takes that keyword. Default: none."""
        return {}

    @classmethod
    def resolve_config(cls, cfg: Any, info) -> Any:
        """The objective's config with what the data fixes filled in (e.g. a number of classes left
        at 0); ``info`` is the train split's :class:`data.DatasetInfo`. Called before the objective
        is built; the run's config.yaml records the result. Default: the config as it is."""
        return cfg

    def evaluate(self, loader, final: bool = False) -> dict[str, float]:
        """Numbers measured on the ``eval_split`` images, e.g. ``{"acc": 0.93}``.

        ``loader`` yields the batch schema's evaluation batches (:meth:`BatchSchema.eval_loader`;
        for images ``{"image", "label", "index"}``, resized and normalised, in the run's memory
        layout); the loop runs this under the run's precision on every rank, every
        ``eval_every`` steps and once more at the end (``final=True``, where it may report more),
        and logs each number as ``<split>_<name>`` (``test_acc``) into metrics.jsonl and
        train_summary.json. Default: nothing.
        """
        return {}

    def export_state(self, state: dict[str, Tensor], run: dict) -> tuple[dict, dict] | None:
        """What ``weights.safetensors`` holds: ``(tensors, extra metadata)`` from the whole model's
        state dict ``state``, or None to write no weights file.

        ``run`` describes the run: ``config`` (the resolved config as a plain dict), ``towers`` (what
        the data fixed about each tower: ``{"image": {"in_chans", "image_size"}}``) and ``final``
        (False after a planned stop before ``max_steps``). The extra metadata is written over the
        loop's own (``objective``, ``backbone``, ``format``, ``towers``, ``config``). Default: every
        tensor, no extra metadata.
        """
        return state, {}

    def on_data(self, train_ds) -> None:
        """Called once with the dataset the objective trains on, after it is built and before the
        engine wraps it (and before a resume restores its state): statistics of the data, such as
        the standardisation of frozen features. Default: nothing."""

    def on_train_start(self, steps_per_epoch: float) -> None:
        """Called once before training (and before a resume restores state), with the number of
        optimizer steps one pass over the training set takes. Default: nothing."""

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called after each optimizer step (EMA teachers, step counters). Default: nothing."""

    def check_metrics(self, metrics: dict) -> str | None:
        """A warning about a logged record (``{"step", "loss", ...}``), e.g. a collapse, or None.
        The loop prints the first one of a run. Default: none."""
        return None

    def param_projections(self) -> list[tuple[nn.Parameter, Callable[[Tensor], Tensor]]]:
        """``(parameter, fn)`` pairs: after every optimizer step the engine replaces the parameter
        by ``fn(parameter)`` (e.g. SwAV's unit-norm prototypes).

        The engine applies them to the parameters the optimizer really updates (under DeepSpeed
        the fp32 master copy as well as the module's copy), which an ``on_step_end`` editing the
        module's tensors could not. Default: none.
        """
        return []

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimizer updates (teachers excluded)."""
        return [m for m in self.children()]

    def param_groups(self) -> list[dict]:
        """Two groups: weights with decay, and norms/biases without decay or LARS adaptation."""
        return decay_groups(self.trainable_modules())

    @torch.no_grad()
    def embed(self, batch: dict) -> Tensor:
        """Frozen features [B, D] that probes and search indexes use: the pooled image-tower output."""
        return self.tower("image").forward_pooled(batch["image"]).float()


def decay_groups(modules, prefix: str = "", **extra) -> list[dict]:
    """Optimizer groups for the trainable parameters of ``modules``: weights (ndim > 1) with weight
    decay, and norms/biases without decay or LARS adaptation. ``extra`` (e.g. ``lr_scale``) is set
    on both groups; ``prefix`` is put before their names."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "name": prefix + "decay", **extra}]
    if no_decay:
        groups.append({"params": no_decay, "name": prefix + "no_decay", "weight_decay": 0.0, "lars_exclude": True,
                       **extra})
    return groups


#: Objective name -> Objective class; the entry's meta holds its ``config_cls`` (a dataclass).
OBJECTIVES: Registry = Registry("objective")


def register_objective(name: str, config_cls: type):
    """Class decorator: ``@register_objective("byol", ByolConfig)``; config_cls is a dataclass."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register_objective('{name}'): config class must be a dataclass")

    def deco(cls):
        OBJECTIVES.register(name, cls, config_cls=config_cls)
        cls.name = name
        return cls

    return deco


def list_objectives() -> list[str]:
    return OBJECTIVES.names()


def _lookup(name: str):
    """``(Objective class, config class)``; an unknown name raises UnknownNameError (a ValueError)."""
    return OBJECTIVES.get(name), OBJECTIVES.meta(name)["config_cls"]


def objective_class(name: str) -> type[Objective]:
    return _lookup(name)[0]


def objective_config_class(name: str) -> type:
    return _lookup(name)[1]


def create_objective(name: str, towers, config: Any = None, fixed: dict | None = None, **overrides) -> Objective:
    """Build a registered objective around its towers.

    Args:
        name: registered objective name (see :func:`list_objectives`).
        towers: ``{tower name: backbone}`` for the towers the objective declares, or, for
            image-only objectives, the image backbone itself (``forward_pooled``, ``embed_dim``).
        config: the objective's Config instance; defaults are used when None.
        fixed: the objective's fixed modules (see :meth:`Objective.fixed_modules`); None loads them.
        **overrides: Config fields to replace.
    """
    cls, cfg_cls = _lookup(name)
    cfg = config if config is not None else cfg_cls()
    if overrides:
        valid = [f.name for f in dataclasses.fields(cfg_cls)]
        bad = [k for k in overrides if k not in valid]
        if bad:
            raise TypeError(f"objective '{name}' has no option {bad[0]!r}; valid: {', '.join(valid)}")
        cfg = dataclasses.replace(cfg, **overrides)
    if fixed is None:
        fixed = cls.fixed_modules(cfg)
    return cls(towers, cfg, **fixed)
