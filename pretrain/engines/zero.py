"""The DeepSpeed engine (ZeRO stages 0-3), the launcher's process group, and checkpoint consolidation.

This package is the only place that imports ``deepspeed``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from data.common import UserError

from .base import (Engine, autocast_context, load_optimizer_state_by_name, map_tensors, optimizer_state_by_name,
                   projections_of, tensor_names)


class DeepSpeedConfigError(UserError, ValueError):
    """A DeepSpeed JSON config is missing, malformed or contradicts the recipe."""

TP_SPLITS = "tensor_parallel.json"
GATHERED = "gathered_model.pt"  # ZeRO-3 with tensor parallelism: the whole model, gathered at save time
DS_CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "ds_configs"


def init_distributed(engine: str) -> tuple[int, int]:
    """Start the process group for ``engine`` (no-op for ``plain``); returns (rank, world_size).

    Under the ``deepspeed`` launcher the rank and world size come from its environment; on
    machines without a GPU the backend is gloo.
    """
    if engine != "deepspeed":
        return 0, 1
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed(wait: bool = True) -> None:
    """End a launcher job on this rank: wait for all ranks, remove this rank's shared-memory
    all-reduce buffer, and destroy the process group.

    DeepSpeed's CPU communication backend maps a ~66 MB buffer per rank under ``/dev/shm``
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never removes it, so every job
    would leave RAM-backed files behind until the machine runs out of shared memory. A rank that
    exits with communication threads still alive can also abort at shutdown.

    ``wait=False`` is for a failed job: the launcher is stopping the other ranks, so a barrier could
    wait forever; the buffer is only unlinked (ranks that still have it mapped keep using it).
    """
    import glob
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()  # every rank has finished its last collective; the mapped buffers stay valid when unlinked
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    local_rank = os.environ.get("LOCAL_RANK")
    if addr and port and local_rank is not None:
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{local_rank}"):
            try:
                os.unlink(f)
            except OSError:
                pass
    if wait:
        dist.destroy_process_group()


def ds_config(path: str, zero_stage: int | None, micro_batch: int, grad_accum: int, world_size: int,
              grad_clip: float) -> dict:
    """Read a DeepSpeed JSON config and derive its batch fields from the recipe.

    ``train_batch_size = micro_batch * grad_accum * world_size``, where ``world_size`` is the
    number of data-parallel ranks (the parallel layout's ``dp``); a JSON that states other batch
    values is an error, since the recipe is the single source of them.
    """
    import json

    stage = 0 if zero_stage is None else zero_stage
    p = Path(path) if path else DS_CONFIGS / f"zero{stage}.json"
    if not p.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config '{p}' does not exist (see {DS_CONFIGS} for examples)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"DeepSpeed config '{p}' is not valid JSON: {exc}") from None
    derived = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
               "train_batch_size": micro_batch * grad_accum * world_size}
    for k, v in derived.items():
        if k in cfg and cfg[k] not in (v, "auto"):
            raise DeepSpeedConfigError(f"DeepSpeed config '{p}': {k}={cfg[k]} disagrees with the recipe ({k}={v}, from "
                             f"batch_size={micro_batch}, optim.grad_accum={grad_accum}, world size {world_size}); "
                             f"remove it from the JSON or set it to \"auto\"")
        cfg[k] = v
    if zero_stage is not None and path:
        cfg.setdefault("zero_optimization", {})["stage"] = zero_stage
    if grad_clip > 0 or "gradient_clipping" not in cfg:
        # the recipe's optim.grad_clip (0 = off); a JSON without the key would get DeepSpeed's default, 1.0
        cfg["gradient_clipping"] = grad_clip
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def zero_stage_of(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedEngine(Engine):
    """The same interface as :class:`PlainEngine`, backed by ``deepspeed.initialize``.

    The client optimizer and LR schedule are handed to DeepSpeed, which steps them at
    gradient-accumulation boundaries. With ``precision=bf16`` and no ``bf16`` section in the
    JSON, the forward runs under autocast with fp32 master weights (as the plain engine does);
    a JSON with ``"bf16": {"enabled": true}`` uses DeepSpeed's own bf16 mode instead, and float
    inputs are cast to bf16.
    """

    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer, schedule, config: dict, precision: str = "fp32",
                 layout=None):
        import deepspeed
        import torch.distributed as dist

        self.schedule = schedule
        self.precision = precision
        self.native_bf16 = bool(config.get("bf16", {}).get("enabled", False))
        # the layout answers DeepSpeed's mpu questions when the world is not one data-parallel group
        mpu = layout if layout is not None and layout.dp != dist.get_world_size() else None
        self.layout = layout
        _forget_previous_mpu()
        splits = None
        if self.tp > 1:  # DeepSpeed's AutoTP cuts the blocks inside initialize; how, is recorded after
            from ..parallel.tensor_parallel import autotp_config, plan_splits

            section = autotp_config(model, self.tp)
            given = config.get("tensor_parallel")
            if given and given.get("autotp_size", self.tp) != self.tp:
                raise DeepSpeedConfigError(f"the DeepSpeed config's tensor_parallel.autotp_size="
                                           f"{given.get('autotp_size')} disagrees with parallel.tp={self.tp}; "
                                           f"remove the section (the run writes it from parallel.tp)")
            config = {**config, "tensor_parallel": {**(given or {}), **section}}
            splits = plan_splits(model, layout.tp_rank, self.tp)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=schedule, config=config, mpu=mpu)
        self.module = self.engine.module
        self._check_tp_batch = False
        if splits is not None:
            from ..parallel.tensor_parallel import mark_tensor_parallel_splits

            mark_tensor_parallel_splits(self.module, splits)
            # DeepSpeed's own first-batch check compares nested dicts of tensors with `!=` and fails on
            # ours; the same check (one batch, every tensor-parallel rank) is done here by checksums
            hook = getattr(self.engine, "first_dataloader_check", None)
            if hook is not None:
                hook.remove()
            self._check_tp_batch = True
        self._net = self.engine
        self.zero_stage = zero_stage_of(config)
        self.grad_accum = int(config.get("gradient_accumulation_steps", 1))
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.steps = 0
        self.is_boundary = False
        self.last_grad_norm = None
        self.projections = projections_of(self.module)
        if self.zero_stage == 3 and getattr(self.module, "has_ema_teacher", False):
            self.module.ema_update_fn = _zero3_ema_update

    def prepare(self, batch: dict) -> dict:
        """With DeepSpeed's own bf16 mode every floating-point input is cast to bf16."""
        if self.native_bf16:
            return map_tensors(batch, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t)
        return batch

    def __call__(self, batch: dict) -> dict:
        if self._check_tp_batch:
            self._check_tp_batch = False
            _check_same_batch(batch, self.layout.tp_group, self.layout.tp)
        if self.native_bf16:
            return self.engine(self.prepare(batch))
        with autocast_context(self.precision):
            return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.is_boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if self.is_boundary:
            self.steps += 1
            if self.projections:
                self._project()

    @torch.no_grad()
    def _project(self) -> None:
        """Apply the model's parameter projections to the parameters the optimizer updates.

        Under ZeRO 1-2 and DeepSpeed's bf16 mode the optimizer steps an fp32 master copy and
        copies it into the module after each step, so projecting only the module's tensor would
        be undone by the next step: the master copy is projected and the module's copy set from
        it. Under ZeRO-3 the parameter is gathered for the edit and partitioned again. Without
        a master copy (ZeRO-0 in fp32) the module's tensor is the one the optimizer updates.
        """
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for p, fn in self.projections:
            ctx = (deepspeed.zero.GatheredParameters([p], modifier_rank=0) if hasattr(p, "ds_id")
                   else contextlib.nullcontext())
            with ctx:
                master = safe_get_full_fp32_param(p)  # a collective where the master is partitioned
                if master is None:
                    p.copy_(fn(p))
                    continue
                new = fn(master.float()).to(master.dtype)
                if hasattr(p, "ds_id"):
                    _set_zero3_fp32_partition(p, new)
                else:
                    safe_set_full_fp32_param(p, new)
                p.copy_(new.to(p.dtype))

    @property
    def tp(self) -> int:
        return self.layout.tp if self.layout is not None else 1

    @property
    def portable(self) -> bool:
        """Whether the optimizer state reads and writes per parameter: ZeRO-0 (the client optimizer
        steps the module's own parameters) and ZeRO 1-2 (flat partitions, read and written per
        parameter through DeepSpeed's ``safe_*_full_optimizer_state``), in fp32 or autocast. Not
        ZeRO-3 (partitioned parameters) nor DeepSpeed's own bf16 mode."""
        return self.zero_stage <= 2 and not self.native_bf16

    def _flat_state(self) -> dict:
        """ZeRO 1-2: one state entry of the inner optimizer (over flat partitions), for its keys and scalars."""
        inner = self.engine.optimizer.optimizer
        return next((st for st in inner.state.values() if st), {})

    def _link_flat_state(self, like: dict | None = None) -> None:
        """ZeRO 1-2: make DeepSpeed's per-parameter views into the flat optimizer state (``safe_*``).
        It links them after a step; a run resumed before its first step has no state yet, so one is
        made here with the keys of ``like`` (zeros, to be overwritten)."""
        zero = self.engine.optimizer
        inner = zero.optimizer
        if like:
            for group in inner.param_groups:
                for flat in group["params"]:
                    if not inner.state.get(flat):
                        inner.state[flat] = {k: torch.zeros_like(flat) if torch.is_tensor(v) and v.dim() > 0
                                             else (v.clone() if torch.is_tensor(v) else v) for k, v in like.items()}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _optimizer_state(self, names: dict) -> dict:
        """Per-parameter optimizer state by name, each tensor this rank's piece of the tensor-parallel
        cut (whole under ZeRO 0; assembled over the data-parallel group under ZeRO 1-2: a collective)."""
        if self.zero_stage == 0:
            return optimizer_state_by_name(self.engine.optimizer, names)
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_flat_state()
        flat = self._flat_state()
        keys = sorted(k for k, v in flat.items() if torch.is_tensor(v) and v.dim() > 0)
        scalars = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in flat.items() if k not in keys}
        out = {}
        for n, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            full = {k: safe_get_full_optimizer_state(p, k) for k in keys}  # a collective per tensor
            if all(v is not None for v in full.values()):  # None: a parameter the optimizer does not step
                out[n] = {**scalars, **{k: v.detach().clone() for k, v in full.items()}}
        return out

    def portable_state(self) -> dict | None:
        if not self.portable:
            return None
        names = tensor_names(self.module)
        opt = self._optimizer_state(names)
        if self.tp > 1:  # shards of the model and of the per-parameter state, put back together
            from ..parallel.tensor_parallel import gather_tensor_parallel_state

            model = gather_tensor_parallel_state(self.module, self.layout.tp_group)
            for key in sorted({k for st in opt.values() for k, v in st.items() if torch.is_tensor(v) and v.dim()}):
                full = gather_tensor_parallel_state(self.module, self.layout.tp_group,
                                                    {n: st[key] for n, st in sorted(opt.items()) if key in st})
                for n, v in full.items():
                    opt[n][key] = v
        else:
            model = self.module.state_dict()
        if self.rank != 0:
            return None
        return {"model": model, "optimizer": opt, "schedule": self.schedule.state_dict(), "steps": self.steps}

    def load_portable(self, state: dict) -> None:
        if not self.portable:
            raise DeepSpeedCheckpointError(f"resuming under another layout needs ZeRO 0-2 in this run (it has ZeRO-"
                                           f"{self.zero_stage}{' and DeepSpeed bf16' if self.native_bf16 else ''})")
        cut = lambda name, t: t  # noqa: E731
        model = state["model"]
        if self.tp > 1:
            from ..parallel.tensor_parallel import shard_full_state, tensor_parallel_splits

            splits = tensor_parallel_splits(self.module)
            model = shard_full_state(model, self.module)
            cut = lambda name, t: splits[name].shard(t) if name in splits else t  # noqa: E731
        self.module.load_state_dict(model)
        if self.zero_stage == 0:
            load_optimizer_state_by_name(self.engine.optimizer, tensor_names(self.module), state["optimizer"], cut)
        else:  # the fp32 master copy and the optimizer state live in flat partitions: set per parameter
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            like = next(iter(state["optimizer"].values()), {})
            self._link_flat_state(like)
            flat = self._flat_state()
            scalars = None
            for n, p in self.module.named_parameters():
                if not p.requires_grad or not hasattr(p, "_hp_mapping"):
                    continue
                safe_set_full_fp32_param(p, p.detach().float())
                saved = state["optimizer"].get(n, {})
                for k, v in saved.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        safe_set_full_optimizer_state(p, cut(n, v).float(), k)
                    elif scalars is None or k not in scalars:
                        scalars = {**(scalars or {}), k: v}
            for st in self.engine.optimizer.optimizer.state.values():
                for k, v in (scalars or {}).items():
                    if k in flat:
                        st[k] = v.clone() if torch.is_tensor(v) else v
        self.schedule.load_state_dict(state["schedule"])
        self.steps = int(state["steps"])
        self.engine.global_steps = self.steps
        self.engine.micro_steps = self.steps * self.grad_accum

    def save(self, directory, client_state: dict) -> None:
        """Every rank writes its shards into ``directory`` (a checkpoint's temporary directory); under
        tensor parallelism rank 0 adds ``tensor_parallel.json``, how each sharded tensor was cut."""
        self.engine.save_checkpoint(str(directory), tag="ds", client_state=client_state, save_latest=False)
        if self.tp > 1 and self.zero_stage == 3:  # every rank takes part; rank 0 writes
            self.engine.save_16bit_model(str(Path(directory) / "ds"), GATHERED)
        if self.tp > 1 and self.rank == 0:
            import json

            from ..parallel.tensor_parallel import splits_to_json

            (Path(directory) / "ds" / TP_SPLITS).write_text(json.dumps(splits_to_json(self.module)))

    def load(self, directory) -> dict:
        path, client_state = self.engine.load_checkpoint(str(directory), tag="ds")
        if path is None:
            raise DeepSpeedCheckpointError(f"no DeepSpeed checkpoint under '{directory}/ds'")
        return client_state or {}

    def full_state_dict(self, checkpoint_dir=None) -> dict | None:
        """The whole model's fp32 state dict on rank 0 (None elsewhere), for any ZeRO stage."""
        if self.tp > 1 and self.zero_stage < 3:  # the blocks' shards put back together (a collective per tp group)
            from ..parallel.tensor_parallel import gather_tensor_parallel_state

            state = gather_tensor_parallel_state(self.module, self.layout.tp_group)
            return state if self.rank == 0 else None
        if self.zero_stage < 3:
            return self.module.state_dict() if self.rank == 0 else None
        if checkpoint_dir is None:  # ZeRO-3, with tensor parallelism too (save() wrote the gathered model)
            raise ValueError("ZeRO-3 export needs the directory of a saved checkpoint")
        import torch.distributed as dist

        dist.barrier()
        return consolidate_deepspeed_checkpoint(checkpoint_dir) if self.rank == 0 else None


def _check_same_batch(batch: dict, group, size: int) -> None:
    """Raises when the ranks of a tensor-parallel group were handed different batches (their
    activations outside the cut layers are replicated, so they must read the same samples)."""
    import torch.distributed as dist

    sums = []
    map_tensors(batch, lambda t: sums.append(t.detach().double().sum().reshape(1)) or t)
    local = torch.cat(sums) if sums else torch.zeros(1, dtype=torch.float64)
    got = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(got, local, group=group)
    if not all(torch.equal(g, got[0]) for g in got):
        raise RuntimeError("the ranks of a tensor-parallel group read different batches; they must share the "
                           "data-parallel rank and seed (see docs/parallel.md)")


def _forget_previous_mpu() -> None:
    """DeepSpeed keeps the last engine's model-parallel unit in a module global and reads it when
    the next engine has none: a data-parallel run after a pipeline or tensor-parallel one in the
    same process would take the old layout's sizes. Each engine starts from its own."""
    from deepspeed.utils import groups

    groups.mpu = None
    # AutoTP's data / tensor-parallel groups are module globals too, made once per process
    for name in ("_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK", "mesh_device"):
        if hasattr(groups, name):
            setattr(groups, name, None)


@torch.no_grad()
def _set_zero3_fp32_partition(param, value: torch.Tensor) -> None:
    """Write this rank's slice of ``value`` into ZeRO-3's fp32 partition of ``param``. DeepSpeed's
    ``safe_set_full_fp32_param`` slices past the end of a tensor smaller than the world (a [1]
    parameter on 2 ranks: rank 1 holds only padding) and fails; a partition past the end keeps
    its padding here."""
    opt = param._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    n = part.numel()
    piece = value.flatten()[n * opt._get_param_partition_rank(param):][:n]
    part.data[:piece.numel()].copy_(piece)
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)


def _zero3_ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` on ZeRO-3 partitioned parameters.

    ZeRO-3 splits every parameter into equal flat shards by its number of elements, so a teacher
    and a student parameter of the same shape are split alike and each rank can average its own
    shards (``ds_tensor``) with no communication. Parameters that ZeRO-3 holds whole at this point
    (small "persistent" ones, and any it kept gathered for reuse) are gathered again from the
    updated shards, so the next forward sees the new values. Buffers are not partitioned and are
    copied.
    """
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"target and online have different numbers of parameters: {len(t_params)} vs {len(o_params)}")
    for i, (t, o) in enumerate(zip(t_params, o_params)):
        if not (hasattr(t, "ds_tensor") and hasattr(o, "ds_tensor")):
            raise ValueError(f"parameter #{i} is not partitioned by ZeRO-3")
        if tuple(t.ds_shape) != tuple(o.ds_shape) or t.ds_tensor.shape != o.ds_tensor.shape:
            raise ValueError(f"parameter #{i} differs between target and online: {tuple(t.ds_shape)} vs {tuple(o.ds_shape)}")
    shards_t = [t.ds_tensor for t in t_params]
    shards_o = [o.ds_tensor.to(t.dtype) for t, o in zip(shards_t, o_params)]
    if momentum != 1.0:
        torch._foreach_lerp_(shards_t, shards_o, 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = [t for t in t_params if t.ds_status == ZeroParamStatus.AVAILABLE]
    if whole:  # drop the stale whole copies, then gather them from the updated shards
        whole[0].partition(param_list=whole)
        whole[0].all_gather(param_list=whole)


def consolidate_deepspeed_checkpoint(checkpoint_dir) -> dict:
    """fp32 state dict of a DeepSpeed checkpoint of any ZeRO stage (``<checkpoint_dir>/ds``), in one process."""
    ds_dir = Path(checkpoint_dir) / "ds"
    if not ds_dir.is_dir():
        raise DeepSpeedCheckpointError(f"'{checkpoint_dir}' holds no DeepSpeed checkpoint (no ds/ directory)")
    from .pipeline import LAYER_MAP, consolidate_pipeline_checkpoint

    if (ds_dir / LAYER_MAP).is_file():  # a pipeline-parallel run: one file per layer
        return consolidate_pipeline_checkpoint(ds_dir)
    if (ds_dir / GATHERED).is_file():  # ZeRO-3 with tensor parallelism: the whole model, gathered when saved
        return {k: v.float() for k, v in torch.load(ds_dir / GATHERED, map_location="cpu", weights_only=False).items()}
    states = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
    if (ds_dir / TP_SPLITS).is_file():  # tensor parallel: one file per tp rank, sharded tensors put back
        import json

        from ..parallel.tensor_parallel import unshard_from_json

        if not states:
            raise DeepSpeedCheckpointError(f"'{ds_dir}' holds no model states file")
        shards = [torch.load(p, map_location="cpu", weights_only=False)["module"] for p in states]
        return unshard_from_json(json.loads((ds_dir / TP_SPLITS).read_text()), shards)
    if list(ds_dir.glob("*optim_states.pt")) and any("zero" in p.name for p in ds_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ds"))
    if not states:
        raise DeepSpeedCheckpointError(f"'{ds_dir}' holds no model states file")
    return torch.load(states[0], map_location="cpu", weights_only=False)["module"]


class DeepSpeedCheckpointError(UserError, FileNotFoundError):
    """A directory holds no (complete) DeepSpeed checkpoint."""


def build_deepspeed(cfg, objective: nn.Module, optimizer, schedule, layout, channels_last: bool = False) -> Engine:
    """The DeepSpeed engine of a run config: its JSON (``deepspeed.config`` or the ZeRO stage's
    example), batch fields derived from the recipe and the layout's data-parallel size; with
    ``parallel.pp > 1`` the pipeline engine (:mod:`pretrain.engines.pipeline`). Inputs stay
    contiguous (``channels_last`` is not used: DeepSpeed flattens contiguous parameter buffers)."""
    stage = None if cfg.deepspeed.zero_stage < 0 else cfg.deepspeed.zero_stage
    ds_cfg = ds_config(cfg.deepspeed.config, stage, cfg.batch_size, cfg.optim.grad_accum, layout.dp,
                       cfg.optim.grad_clip)
    stage = zero_stage_of(ds_cfg)
    if layout.pp > 1:
        from .pipeline import build_pipeline

        return build_pipeline(cfg, objective, optimizer, schedule, layout, ds_cfg)
    if layout.tp > 1 and stage == 3:
        # the checkpoint then also holds the whole model, gathered over ZeRO-3's partitions and the
        # tensor-parallel shards by DeepSpeed (save_16bit_model), which export reads
        ds_cfg.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    if stage >= 1 and cfg.optim.name in ("lars", "lamb"):
        raise DeepSpeedConfigError(f"optim.name={cfg.optim.name} computes a trust ratio per layer, but ZeRO stage "
                                   f"{stage} hands the optimizer flattened partitions; use deepspeed.zero_stage=0, "
                                   f"or optim.name=sgd|adamw")
    return DeepSpeedEngine(objective, optimizer, schedule, ds_cfg, cfg.precision, layout=layout)
