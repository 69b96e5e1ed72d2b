"""The DeepSpeed pipeline engine: an objective cut into ``parallel.pp`` stages, trained with 1F1B.

The objective describes itself as a chain (:meth:`~pretrain.objectives.Objective.pipeline_spec`);
the chain becomes a DeepSpeed ``PipelineModule`` whose stages hold either equal parameter counts
(``parallel.partition=parameters``) or equal numbers of layers (``uniform``), and one optimizer step
is DeepSpeed's ``train_batch`` over the step's ``optim.grad_accum`` micro-batches (its 1F1B
schedule: each stage alternates one forward and one backward once the pipe is full). Pipelines run
side by side as data-parallel replicas (``dp = world / pp``) with ZeRO 0 or 1.

Every rank builds the whole objective from the same seed, so the weights start as in one process;
each keeps the parameters of its own stage and frees the others' storage. The names of parameters
stay the objective's own: :meth:`PipelineEngine.full_state_dict` gathers the stages into the state
dict of a one-process run, and each checkpoint carries ``pipeline_layers.json`` (which layer holds
which parameter) so that :func:`~pretrain.engines.zero.consolidate_deepspeed_checkpoint` rebuilds it
offline too.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from data.common import UserError

from .base import (Engine, NonFiniteLossError, autocast_context, load_optimizer_state_by_name, optimizer_state_by_name,
                   tensor_names)

LAYER_MAP = "pipeline_layers.json"


class PipelineConfigError(UserError, ValueError):
    """A pipeline-parallel run asks for something DeepSpeed's pipeline engine cannot do."""


def _pipe_module(spec, **kwargs):
    """A DeepSpeed ``PipelineModule`` of ``spec``'s layers whose loss also reports ``spec.metrics``
    (DeepSpeed averages "additional losses" over micro-batches and data-parallel ranks and
    broadcasts them to every stage; stages without the loss report zeros under the same names)."""
    from deepspeed.pipe import PipelineModule

    class ObjectivePipe(PipelineModule):
        def __init__(self):
            super().__init__(layers=list(spec.layers), loss_fn=self._loss, **kwargs)
            self.metric_names = tuple(spec.metrics)
            self.last_metrics = None

        def _loss(self, outputs, labels):
            out = spec.loss(outputs, labels)
            self.last_metrics = OrderedDict((k, out[k].detach().float().reshape(())) for k in self.metric_names)
            return out["loss"]

        def get_additional_losses(self):
            if not self.metric_names:
                return None
            if self.last_metrics is None:
                return OrderedDict((k, torch.zeros(())) for k in self.metric_names)
            return self.last_metrics

    return ObjectivePipe()


class PipelineEngine(Engine):
    """:class:`~pretrain.engines.base.Engine` over DeepSpeed's ``PipelineEngine``.

    ``train_step(micro_batches)`` is one ``train_batch``: the first stage reads the inputs of each
    micro-batch and the last stage its labels (every rank of a pipeline draws the same batches, as
    they share a data-parallel rank). The returned metrics are the mean loss and ``spec.metrics``
    over the micro-batches, already averaged over the data-parallel replicas, on every stage.

    A non-finite loss is noticed only after DeepSpeed's schedule has applied the update (the
    stages step together and cannot wait for the last one's loss), so the run stops with that
    step's update applied and no checkpoint written after it.
    """

    name = "deepspeed-pipeline"

    def __init__(self, objective: nn.Module, spec, optimizer, schedule, config: dict, layout, precision: str = "fp32",
                 partition: str = "parameters", activation_checkpoint: int = 0):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        layers = list(spec.layers)
        names = tensor_names(objective)
        owned = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
        outside = [n for n, p in objective.named_parameters() if p.requires_grad and id(p) not in owned]
        if outside:
            raise PipelineConfigError(f"pipeline_spec() of objective '{getattr(objective, 'name', '?')}' leaves "
                                      f"trainable parameters outside its layers: {', '.join(outside[:5])}")
        # which objective tensor each layer's state-dict entry is, for gathering and offline consolidation
        self.layer_map = [{k: names[id(t)] for k, t in layer.state_dict(keep_vars=True).items() if id(t) in names}
                          for layer in layers]
        topology = PipeDataParallelTopology(num_pp=layout.pp, num_dp=layout.dp)
        pipe = _pipe_module(spec, topology=topology, partition_method=partition,
                            activation_checkpoint_interval=activation_checkpoint)
        self.parts = list(pipe.parts)  # stage s holds layers parts[s]:parts[s + 1]
        local = {id(t) for t in [*pipe.parameters(), *pipe.buffers()]}
        # the optimizer steps this stage's parameters only
        for g in optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) in local]
        optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
        # the other stages' tensors: their storage is freed (shapes kept to restore them for evaluation)
        self.remote = {}
        for n, t in [*objective.named_parameters(), *objective.named_buffers()]:
            if id(t) in owned and id(t) not in local and n not in self.remote:
                self.remote[n] = (t, tuple(t.shape))
                t.data = torch.empty(0, dtype=t.dtype)
        self.local_names = {names[i] for i in local if i in names}
        # DeepSpeed clips each stage by its own gradient norm (its model-parallel group is the
        # tensor-parallel slice, not the pipeline); the norm over the whole model is taken here instead
        self.grad_clip = float(config.get("gradient_clipping", 0.0) or 0.0)
        config["gradient_clipping"] = 0.0  # (a missing key would be DeepSpeed's default, 1.0)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        self.last_grad_norm = None
        if self.grad_clip > 0:
            optimizer.register_step_pre_hook(self._clip)
        from .zero import _forget_previous_mpu

        _forget_previous_mpu()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer,
                                                                 lr_scheduler=schedule, config=config)
        self.spec, self.layout, self.objective = spec, layout, objective
        self.module = objective  # what on_step_end and evaluation see; this stage's parameters are live
        self._net = self.engine
        self.schedule, self.precision = schedule, precision
        self.grad_accum = int(config.get("gradient_accumulation_steps", 1))
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.steps = 0

    # -- training ---------------------------------------------------------------------------------------

    def train_step(self, micro_batches) -> dict[str, float]:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; this pipeline runs "
                             f"{self.grad_accum} per optimizer step")
        # DeepSpeed reads the inputs on the first stage and the labels on the last only (labels may cost a
        # forward pass, e.g. BEiT v2's tokenizer), so each stage prepares what it reads
        first, last = self.engine.is_first_stage(), self.engine.is_last_stage()
        feed = iter([(self.spec.inputs(b) if first else None, self.spec.labels(b) if last else None)
                     for b in micro_batches])
        with autocast_context(self.precision):
            loss = self.engine.train_batch(data_iter=feed)
        self.steps += 1
        value = float(loss)
        if not torch.isfinite(torch.tensor(value)):
            raise NonFiniteLossError(value, 0)
        metrics = {"loss": value}
        for k, v in (self.engine.agg_additional_losses or {}).items():
            metrics[k] = float(v)
        return metrics

    @torch.no_grad()
    def _clip(self, optimizer, *_):
        """Before the optimizer steps: scale every gradient by ``min(1, clip / |g|)`` with ``|g|`` the
        norm over the whole model, as one process clips. The optimizer sees this stage's gradients
        (ZeRO-0: whole tensors, the same on every data-parallel replica once reduced; ZeRO-1: this
        rank's disjoint flat partition), so squares summed over the world count each element once
        (ZeRO-1) or ``dp`` times (ZeRO-0)."""
        import torch.distributed as dist

        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        total = torch.zeros((), dtype=torch.float64)
        for g in grads:
            total += g.double().pow(2).sum()
        dist.all_reduce(total)
        if self.zero_stage == 0:
            total /= self.layout.dp
        norm = float(total.sqrt())
        self.last_grad_norm = norm
        coef = self.grad_clip / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)

    def __call__(self, batch: dict) -> dict:
        raise RuntimeError("a pipeline engine runs whole steps (train_step), not single micro-batches")

    # -- the whole model ------------------------------------------------------------------------------

    def _stage_state(self) -> dict:
        """This stage's tensors by their objective names (on every rank of the stage)."""
        return {n: t.detach().clone() for n, t in
                [*self.objective.named_parameters(), *self.objective.named_buffers()] if n in self.local_names}

    def _gather_stages(self) -> dict:
        """Every stage's tensors by name, on every rank of this pipeline (a collective over it)."""
        import torch.distributed as dist

        parts = [None] * self.layout.pp
        dist.all_gather_object(parts, self._stage_state(), group=self.layout.pp_group)
        full = {}
        for p in parts:
            full.update(p)
        return full

    def run_evaluation(self, fn) -> dict:
        """``fn(objective)`` on the first stage's ranks with the whole model restored there for the
        call (then freed again); every rank returns the first stage's result."""
        import torch.distributed as dist

        full = self._gather_stages()
        first = self.layout.rank % (self.layout.dp * self.layout.tp)  # global rank of stage 0 in my pipeline
        result = [None]
        if self.layout.pp_rank == 0:
            with torch.no_grad():
                for n, (t, shape) in self.remote.items():
                    t.data = full[n].reshape(shape).to(t.dtype)
            try:
                result = [fn(self.objective)]
            finally:
                for t, _ in self.remote.values():
                    t.data = torch.empty(0, dtype=t.dtype)
        dist.broadcast_object_list(result, src=first, group=self.layout.pp_group)
        return result[0]

    def full_state_dict(self, checkpoint_dir=None) -> dict | None:
        """The one-process state dict of the objective on rank 0 (None elsewhere)."""
        full = self._gather_stages()
        if self.rank != 0:
            return None
        state = self.objective.state_dict()
        missing = [n for n in state if n not in full and state[n].numel() == 0]
        if missing:
            raise RuntimeError(f"pipeline stages did not return {missing[:5]}")
        state.update(full)
        return state

    def portable_state(self) -> dict | None:
        """Under ZeRO-0: every stage's tensors and per-parameter optimizer state, gathered by name."""
        import torch.distributed as dist

        if self.zero_stage != 0:
            return None
        mine = {"model": self._stage_state(),
                "optimizer": optimizer_state_by_name(self.optimizer, tensor_names(self.objective))}
        parts = [None] * self.layout.pp
        dist.all_gather_object(parts, mine, group=self.layout.pp_group)
        if self.rank != 0:
            return None
        state = self.objective.state_dict()
        opt = {}
        for p in parts:
            state.update(p["model"])
            opt.update(p["optimizer"])
        return {"model": state, "optimizer": opt, "schedule": self.schedule.state_dict(), "steps": self.steps}

    def load_portable(self, state: dict) -> None:
        from .zero import DeepSpeedCheckpointError

        if self.zero_stage != 0:
            raise DeepSpeedCheckpointError(f"resuming under another layout needs ZeRO-0 in this run (it has ZeRO-"
                                           f"{self.zero_stage})")
        with torch.no_grad():
            for n, t in [*self.objective.named_parameters(), *self.objective.named_buffers()]:
                if n in self.local_names:
                    t.copy_(state["model"][n])
        load_optimizer_state_by_name(self.optimizer, tensor_names(self.objective), state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.steps = int(state["steps"])
        self.engine.global_steps = self.steps
        self.engine.micro_steps = self.steps * self.grad_accum

    # -- checkpoints ------------------------------------------------------------------------------------

    def save(self, directory, client_state: dict) -> None:
        """DeepSpeed's pipeline checkpoint (``layer_XX-model_states.pt`` per layer, optimizer states per
        rank) plus ``pipeline_layers.json``: each layer's state-dict names -> the objective's names."""
        self.engine.save_checkpoint(str(directory), tag="ds", client_state=client_state, save_latest=False)
        if self.rank == 0:
            (Path(directory) / "ds" / LAYER_MAP).write_text(json.dumps(self.layer_map))

    def load(self, directory) -> dict:
        from .zero import DeepSpeedCheckpointError

        path, client_state = self.engine.load_checkpoint(str(directory), tag="ds")
        if path is None:
            raise DeepSpeedCheckpointError(f"no DeepSpeed pipeline checkpoint under '{directory}/ds'")
        return client_state or {}


def consolidate_pipeline_checkpoint(ds_dir: Path) -> dict:
    """The objective's state dict from a pipeline checkpoint's per-layer files, in one process."""
    layer_map = json.loads((ds_dir / LAYER_MAP).read_text())
    state = {}
    for i, names in enumerate(layer_map):
        path = ds_dir / f"layer_{i:02d}-model_states.pt"
        if not names:
            continue
        if not path.is_file():
            from .zero import DeepSpeedCheckpointError

            raise DeepSpeedCheckpointError(f"pipeline checkpoint '{ds_dir}' lacks {path.name}")
        layer = torch.load(path, map_location="cpu", weights_only=False)
        for k, v in layer.items():
            if k in names:
                state[names[k]] = v
    return state


def build_pipeline(cfg, objective: nn.Module, optimizer, schedule, layout, ds_cfg: dict) -> PipelineEngine:
    """The pipeline engine of a run config (called by the DeepSpeed engine's builder when ``parallel.pp > 1``)."""
    from .zero import zero_stage_of

    stage = zero_stage_of(ds_cfg)
    if stage >= 2:
        raise PipelineConfigError(f"parallel.pp={layout.pp} with ZeRO stage {stage}: DeepSpeed's pipeline engine "
                                  f"does not support ZeRO-2/3 (they partition gradients, which the pipeline "
                                  f"accumulates per stage across micro-batches); use deepspeed.zero_stage=0 or 1")
    if layout.tp > 1:
        raise PipelineConfigError(f"parallel.pp={layout.pp} with parallel.tp={layout.tp}: pipeline and tensor "
                                  f"parallelism together are not supported; use one of them")
    if ds_cfg.get("bf16", {}).get("enabled") or ds_cfg.get("fp16", {}).get("enabled"):
        raise PipelineConfigError("parallel.pp > 1 with DeepSpeed's own bf16/fp16 mode in the JSON is not supported; "
                                  "use precision=bf16 (autocast) instead")
    from ..objectives import PipelineUnsupportedError

    try:
        spec = objective.pipeline_spec()
    except PipelineUnsupportedError as exc:
        raise PipelineConfigError(f"parallel.pp={layout.pp}: {exc}") from None
    return PipelineEngine(objective, spec, optimizer, schedule, ds_cfg, layout, cfg.precision, cfg.parallel.partition,
                          cfg.parallel.activation_checkpoint)
