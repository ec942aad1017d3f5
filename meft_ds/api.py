"""meft_ds as a library: the methods behind PEFT-style calls.

::

    model = get_sparse_model(AutoModelForCausalLM.from_pretrained(name), SparseConfig())
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-3)  # the engine's part
    loss = model(input_ids, attention_mask, labels=labels).loss     # train as usual, plus:
    norm, coef = model.clip_grad_norm_(1.0)                          # routers + rows
    optimizer.step(); model.row_optimizer().step(lr, clip_coef=coef)  # the CPU rows
    model.save_pretrained("out")                  # the launcher's export format
    model = MeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(name), "out")

A :class:`MeftModel` is a thin layer over a :class:`~meft_ds.methods.base.Method` and the
module its ``apply`` returned: forward, export, import and the method's external state
(the sparse adapter's CPU row store) all go through the method, as in the launcher.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from meft_ds import export, inference, methods, options
from meft_ds.errors import UserError
from meft_ds.methods.base import Method
from meft_ds.methods.read import ReadOptions
from meft_ds.methods.sparse import SparseMethod
from meft_ds.reversible.options import ReversibleOptions
from meft_ds.reversible.sparse import SparseMethodOptions
from meft_ds.trainer import clip_coefficient, grad_sq_norm, lm_loss

SparseConfig = SparseMethodOptions  # the sparse adapter's options (``reversible=True``: MEFT)
ReversibleConfig = ReversibleOptions
ReadConfig = ReadOptions


class RowOptimizer:
    """The sparse adapter's row store with an optimizer's surface.

    The rows' row-sparse AdamW (:mod:`meft_ds.sparse.optim`) runs on the CPU once per
    optimizer step, after the step of the optimizer that trains the routers, at that step's
    learning rate ``lr``: the rows move at ``lr * lr_ratio`` (their keys at ``key_lr_ratio``
    times that). Gradients reach the store during backward; :meth:`step` consumes them.
    Hyper-parameters come from the :class:`SparseConfig`.
    """

    def __init__(self, method: SparseMethod) -> None:
        self.method = method

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """lr_ratio, key_lr_ratio, betas, eps, weight_decay, backend."""
        o = self.method.options
        return {"lr_ratio": o.sparse_lr_ratio, "key_lr_ratio": o.sparse_key_lr_ratio,
                "betas": (o.sparse_beta1, o.sparse_beta2), "eps": o.sparse_eps,
                "weight_decay": o.sparse_weight_decay, "backend": o.sparse_optimizer}

    lr_ratio = property(lambda self: self.hyperparameters["lr_ratio"])
    key_lr_ratio = property(lambda self: self.hyperparameters["key_lr_ratio"])
    betas = property(lambda self: self.hyperparameters["betas"])
    eps = property(lambda self: self.hyperparameters["eps"])
    weight_decay = property(lambda self: self.hyperparameters["weight_decay"])

    def extra_grad_sq_norm(self, loss_scale: float = 1.0) -> float:
        """Squared L2 norm of the rows' gradients of this step, divided by ``loss_scale``
        squared (the scale a ``GradScaler`` left on them), for global clipping."""
        return self.method.external_grad_sq_norm() / loss_scale**2

    def step(self, lr: float, loss_scale: float = 1.0, clip_coef: float = 1.0,
             skip: bool = False) -> None:
        """Update the rows that got gradients (lazy AdamW), gradients times
        ``clip_coef / loss_scale``; ``skip``: drop them without an update (a step the
        routers' optimizer skipped, e.g. a ``GradScaler`` overflow; non-finite row
        gradients skip by themselves)."""
        self.method.step_rows(lr, clip_coef, skip=skip, loss_scale=loss_scale)

    def zero_grad(self) -> None:
        """Drop the row gradients gathered since the last step (:meth:`step` consumes them)."""
        self.method.runtime.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        """The rows' Adam moments and update counts (the rows are in the model's
        ``state_dict``), and the hyper-parameters."""
        state = self.method.external_state(optimizer=True)
        return {"state": {k: v for k, v in state.items() if not k.endswith(".weight")},
                "hyperparameters": self.hyperparameters}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (moments and counts of every layer)."""
        self.method.load_external_state(state_dict["state"])


class MeftModel(nn.Module):
    """A causal LM with a meft_ds method applied; it owns the method's state.

    ``state_dict()`` holds the model's tensors and the sparse store's rows (tied weights
    once, so safetensors can write it); :meth:`adapter_state_dict` only the trained ones,
    optionally with the rows' Adam state.
    """

    # transformers.Trainer reads this after loading a checkpoint with missing keys
    _keys_to_ignore_on_save: list[str] | None = None

    def __init__(self, method: Method, module: nn.Module, base: nn.Module) -> None:
        super().__init__()
        self.method = method
        self.model = module  # what method.apply returned (the base model or a wrapper)
        self.config = base.config
        self.base_model_name = getattr(base.config, "_name_or_path", "") or None
        self._row_optimizer: RowOptimizer | None = None
        first: dict[int, str] = {}
        self._aliases: dict[str, str] = {}  # tied parameter name -> the name kept
        for name, param in self.named_parameters(remove_duplicate=False):
            if id(param) in first:
                self._aliases[name] = first[id(param)]
            else:
                first[id(param)] = name
        self.register_state_dict_post_hook(_state_dict_post_hook)

    @classmethod
    def wrap(cls, model: nn.Module, method: str, config: Any = None) -> MeftModel:
        """``model`` (a transformers causal LM, changed in place) with method ``method``
        applied with ``config`` (its options dataclass; ``None``: the defaults)."""
        method_cls = methods.get(method)
        if config is None:
            config = method_cls.Options()
        if not isinstance(config, method_cls.Options):
            raise TypeError(f"method {method} takes a {method_cls.Options.__name__}, "
                            f"got {type(config).__name__}")
        opts = options.build(method_cls.Options, dataclasses.asdict(config), context=method)
        return cls(*inference.apply_method(model, method_cls, opts, None), model)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> MeftModel:
        """``model`` with the adapter exported in ``directory`` (by :meth:`save_pretrained`
        or the launcher) applied and loaded, in ``model``'s dtype."""
        directory = Path(directory)
        meta, tensors = export.read_adapter(directory)
        if export.is_model(directory):
            raise UserError(f"{directory} is a complete model (a full export): load it with "
                            "transformers' AutoModelForCausalLM.from_pretrained")
        method_cls, opts = inference.export_options(meta, f"adapter {directory}")
        return cls(*inference.apply_method(model, method_cls, opts, tensors), model)

    # --- compute ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        """Logits, and with ``labels`` (-100: ignored) the launcher's loss
        (:func:`meft_ds.trainer.lm_loss`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.method.forward(self.model, input_ids, attention_mask)
        loss = None if labels is None else lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` with a KV cache: the model's own where the method's
        forward is the model's, else the method's generation model (the reversible one)."""
        model = self.method.generation_model(self.model) or self.model
        if not hasattr(model, "generate"):
            raise UserError(f"method {self.method.name}: this model cannot generate")
        return model.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- training -----------------------------------------------------------------------
    def parameter_groups(self) -> list[Any]:
        """The trainable parameters, for your optimizer, in the groups the method's options
        ask for (``sparse_lora_weight_decay``: the LoRA in a group with that decay; a key
        a group leaves out takes the optimizer's default), as the launcher hands them to
        its engine: ``torch.optim.AdamW(model.parameter_groups(), lr=1e-3)``."""
        return self.method.parameter_groups([p for p in self.parameters() if p.requires_grad])

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``UserError`` unless ``optimizer`` gives every parameter of
        :meth:`parameter_groups` its group's settings (e.g. one built over
        ``model.parameters()`` where an option asks for a group of its own)."""
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for group in self.parameter_groups():
            if not isinstance(group, dict):
                continue
            for key, value in group.items():
                if key != "params" and any(group_of.get(id(p), {}).get(key) != value
                                           for p in group["params"]):
                    raise UserError(
                        f"{self.method.name}: the optimizer does not give every parameter "
                        f"the method's options group its {key}={value!r}; build it over "
                        "model.parameter_groups()")

    def row_optimizer(self) -> RowOptimizer:
        """The sparse adapter's row store as an optimizer (:class:`RowOptimizer`)."""
        if not isinstance(self.method, SparseMethod):
            raise UserError(f"method {self.method.name} has no row store: all it trains is "
                            "in model.parameters()")
        if self._row_optimizer is None:
            self._row_optimizer = RowOptimizer(self.method)
        return self._row_optimizer

    @property
    def has_row_store(self) -> bool:
        """Whether :meth:`row_optimizer` exists (the sparse adapter)."""
        return isinstance(self.method, SparseMethod)

    def clip_grad_norm_(self, max_norm: float, loss_scale: float = 1.0) -> tuple[float, float]:
        """Clip the parameters' gradients and the rows' by their global L2 norm (the
        launcher's clipping); returns (norm before clipping, coefficient), the coefficient
        for :meth:`RowOptimizer.step`. ``loss_scale``: the scale still on the row gradients
        (unscale the parameters' first, e.g. ``GradScaler.unscale_``); ``max_norm <= 0``:
        only the norm."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        extra = self.method.external_grad_sq_norm() / loss_scale**2
        total = math.sqrt(grad_sq_norm(grads) + extra)
        coef = clip_coefficient(total, max_norm)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        return total, coef

    def print_trainable_parameters(self) -> None:
        """Trainable parameters (the rows in CPU RAM included) against all."""
        rows = self.method.external_parameters()
        trainable = rows + sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = rows + sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} (rows in CPU RAM: {rows:,}) || all params: "
              f"{total:,} || trainable%: {100 * trainable / total:.4f}")

    # --- state --------------------------------------------------------------------------
    def adapter_state_dict(self, with_optimizer_state: bool = False) -> dict[str, torch.Tensor]:
        """The trained tensors on the CPU, named as in an export; ``with_optimizer_state``:
        the rows' Adam moments and update counts too."""
        state = self.method.trainable_state(self.model)
        if with_optimizer_state:
            extra = self.method.external_state(optimizer=True)
            state.update({k: v.clone() for k, v in extra.items() if k not in state})
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state_dict` returned."""
        self.method.load_trainable_state(self.model, state)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> None:
        """Export the trained adapter as the launcher does (:mod:`meft_ds.export`), for
        :meth:`from_pretrained`, ``launch/evaluate.py --adapter`` and ``launch/generate.py``."""
        meta = {"method": self.method.name, "model": self.base_model_name,
                "options": dataclasses.asdict(self.method.options),
                "dtype": export.module_dtype(self.model)}
        export.write_export(self.method, self.model, Path(directory), meta, tokenizer)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.method.external_state().items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        for alias, kept in self._aliases.items():
            if prefix + alias not in state_dict and prefix + kept in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + kept]
        names = self.method.external_state(optimizer=True)
        given = {k: state_dict.pop(prefix + k) for k in names if prefix + k in state_dict}
        missing_keys.extend(prefix + k for k in self.method.external_state() if k not in given)
        if given:
            try:
                self.method.load_external_state(given)
            except UserError as exc:
                error_msgs.append(str(exc))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _state_dict_post_hook(module: MeftModel, state_dict: dict, prefix: str,
                          local_metadata: dict) -> None:
    """Each tied tensor once (``load_state_dict`` restores the other names)."""
    for alias in module._aliases:
        state_dict.pop(prefix + alias, None)


def get_meft_model(model: nn.Module, method: str, config: Any = None) -> MeftModel:
    """``model`` with any registered method (``meft_ds.methods.available()``) applied."""
    return MeftModel.wrap(model, method, config)


def get_sparse_model(model: nn.Module, config: SparseConfig | None = None) -> MeftModel:
    """``model`` with the sparse adapter: rows and their Adam state in CPU RAM."""
    return MeftModel.wrap(model, "sparse", config)


def get_reversible_model(model: nn.Module,
                         config: ReversibleConfig | None = None) -> MeftModel:
    """``model`` as a reversible network of adapters (MEFT1/2/3)."""
    return MeftModel.wrap(model, "reversible", config)


def get_read_model(model: nn.Module, config: ReadConfig | None = None) -> MeftModel:
    """``model`` with a READ recurrent side network."""
    return MeftModel.wrap(model, "read", config)
