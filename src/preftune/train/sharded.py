"""What preftune does differently when the model is sharded with FSDP2 (``preftune.train.strategy``).

Under FSDP2 every parameter is a ``DTensor``: each process holds one shard (dimension 0 split over the
processes) and a module's full weights exist only inside its forward, where ``fully_shard``'s hooks gather
them. Three places in preftune need the weights outside that:

* **checkpoints** (``preftune.train.checkpoint``): every process writes its own shards of the model and of
  the optimizer state (``model_shard_R.safetensors``, ``optimizer_shard_R.safetensors``) and reads them back
  into the same shards on resume: no gathering, no pickle, and the same number of processes to resume;
* **the final model**: the full state dict is gathered to the main process (``full_state_dict``, a
  collective every process joins) and saved as an ordinary Hugging Face directory;
* **rollouts** of the online methods: generation and the rollout's scoring call the policy and the value
  network inside the FSDP root (``PolicyWithValue``), not the root's forward, so the root's own parameters
  (embeddings, output head, norms) are gathered around them (``unsharded``); every process then runs the
  same number of decoding steps (``generate(synced_gpus=True)``), because each step's forward is collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["full_state_dict", "is_sharded", "load_local_state", "local", "local_state", "place_reference", "to_like", "unsharded"]


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(model: Any) -> bool:
    """Whether ``model`` (or a module in it) was sharded with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module) and any(isinstance(m, FSDPModule) for m in model.modules())


def local(value: Any) -> Any:
    """A ``DTensor``'s shard on this process; anything else as it is."""
    dtensor = _dtensor()
    return value.to_local() if dtensor is not None and isinstance(value, dtensor) else value


def local_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded tensor replaced by this process's shard (copies: safetensors
    refuses tensors that share memory, as tied weights do)."""
    return {name: local(value).detach().cpu().clone().contiguous() for name, value in model.state_dict().items()}


def load_local_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (one process's :func:`local_state`) into ``model``'s shards in place; the names and
    shapes must be exactly those of the model (ValueError otherwise)."""
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise ValueError(f"the shard does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            target = local(value)
            if tuple(target.shape) != tuple(tensors[name].shape):
                raise ValueError(f"{name}: shard of shape {tuple(tensors[name].shape)}, the model's shard is "
                                 f"{tuple(target.shape)} (written by another number of processes?)")
            target.copy_(tensors[name].to(device=target.device, dtype=target.dtype))


def to_like(tensor: torch.Tensor, param: Any) -> Any:
    """An optimizer state tensor read from a shard file, as a ``DTensor`` laid out like ``param`` when
    ``param`` is sharded and the tensor has its shard's shape (AdamW's moments); else as it is (``step``)."""
    dtensor = _dtensor()
    if dtensor is None or not isinstance(param, dtensor) or tuple(tensor.shape) != tuple(param.to_local().shape):
        return tensor
    return dtensor.from_local(tensor.to(param.to_local().device), device_mesh=param.device_mesh,
                              placements=param.placements, run_check=False, shape=param.shape, stride=param.stride())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the main process, on CPU; ``{}`` on the others. Collective: every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def place_reference(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """A frozen model the loss calls every step (DPO's reference): under FSDP sharded like the policy (it
    would otherwise sit whole in every process), else moved to the device."""
    from preftune.train.strategy import is_fsdp

    if is_fsdp(accelerator):
        from accelerate.utils import fsdp2_prepare_model

        model.requires_grad_(False)
        accelerator.state.fsdp_plugin.set_auto_wrap_policy(model)
        # accelerate's own FSDP2 sharding, not accelerator.prepare: a prepared model joins the ones whose
        # parameters clip_grad_norm_ compares with the policy's
        return fsdp2_prepare_model(accelerator, model).eval()
    return model.to(accelerator.device)


@contextlib.contextmanager
def unsharded(model: Any) -> Iterator[None]:
    """The FSDP2 root's own parameters gathered for the duration (calls into its submodules that bypass the
    root's forward); nothing when ``model`` is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()  # noqa: N806 - a torch without distributed: nothing is sharded
    if not isinstance(model, FSDPModule):
        yield
        return
    # FSDP2 sets up its root at the root's first forward; a submodule called first would claim the root's
    # place (and the root's later forward fails), so the set-up runs here (torch has no public call for it)
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
