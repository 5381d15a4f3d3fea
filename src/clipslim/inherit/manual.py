"""TinyCLIP's manual weight inheritance, as an in-place transform between two stock open_clip models.

The rule (TinyCLIP ``weight_inherit.py``, strategy "interval_front"):

- **Depth.** Student block ``i`` takes teacher block ``interval_layers(L_t, L_s)[i]``: layers ``0, s, 2s, ...`` with
  ``s = floor(L_t / L_s)``, so 12->6 keeps every other layer and 12->9 keeps the first nine.
- **Attention.** ``in_proj_weight`` (3*w, w) is viewed as (3, heads, head_dim, w); the leading student heads and
  leading student input channels are kept (same for ``in_proj_bias``). ``out_proj`` keeps the leading output rows and
  the input columns of the kept heads, which with the leading heads are the leading ``w_s`` columns. Head dim must
  be equal in teacher and student.
- **Everything else** (MLP, LayerNorms, layer scales, embeddings, positional embeddings, projections, ``conv1``) is
  cut to its leading slice ``[:s]`` in every dimension. Sizes that a slice cannot fix must match: patch size, the
  number of image tokens (no grid resizing), vocabulary size.

The copy engine, :func:`inherit_selected`, takes arbitrary teacher index lists per dimension kind (layers, residual
width, heads, FFN channels, embedding channels; :class:`TowerSelection`); the manual rule is the selection of the
leading ones (:func:`manual_selection`). Importance ranking, L0 fusing and block removal reuse the same engine.

Blocks are addressed by explicit index, never through state-dict key order (TinyCLIP selects layers by walking
the ordered keys, which silently picks wrong layers if the keys are ever sorted; see the reference notes, §8.8).

Supported towers: open_clip's native ``VisionTransformer`` (``model.visual``) and native ``TextTransformer`` text
towers, either flattened into a ``CLIP`` (``token_embedding``, ``transformer``, ... at top level) or kept as
``model.text`` in a ``CustomTextCLIP``; default and "custom" (NormFormer-style) residual blocks. ResNet, timm and
Hugging Face towers, and attentional pooling, raise :class:`InheritError`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

__all__ = [
    "InheritError",
    "TowerGeometry",
    "TowerSelection",
    "check_compatible",
    "inherit_manual",
    "inherit_selected",
    "interval_layers",
    "manual_selection",
    "plain_parameters",
    "tower_geometry",
    "tower_pairs",
]


class InheritError(ValueError):
    """Teacher and student cannot be paired by manual inheritance; the message names the offending field."""


def interval_layers(n_teacher: int, n_student: int) -> list[int]:
    """Teacher block indices that the student's blocks inherit: ``0, s, 2s, ...`` with ``s = n_teacher // n_student``.

    >>> interval_layers(12, 6)
    [0, 2, 4, 6, 8, 10]
    >>> interval_layers(12, 9)  # step 1: the first nine
    [0, 1, 2, 3, 4, 5, 6, 7, 8]
    """
    if n_student < 1:
        raise InheritError(f"student depth must be >= 1, got {n_student}")
    if n_student > n_teacher:
        raise InheritError(f"student depth {n_student} > teacher depth {n_teacher}")
    step = n_teacher // n_student
    return [i * step for i in range(n_student)]


# --------------------------------------------------------------------------------------------------------------
# Towers and their geometry


@dataclass(frozen=True)
class Tower:
    kind: str  # "visual" | "text"
    prefix: str  # parameter-name prefix of the tower inside the full model: "visual.", "text." or "" (flat CLIP)
    module: nn.Module  # the module that owns the tower's attributes (the model itself for a flat CLIP text tower)


@dataclass(frozen=True)
class TowerGeometry:
    """Sizes of one tower; ``extent`` is image tokens (visual) or context length (text)."""

    width: int
    layers: int
    heads: int
    head_dim: int
    mlp_width: int
    embed_dim: int
    extent: int
    patch_size: int | None = None  # visual only
    vocab_size: int | None = None  # text only


def _vision_tower(model: nn.Module) -> Tower:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise InheritError(
            f"visual tower {type(visual).__name__} is not supported (only open_clip's native VisionTransformer)"
        )
    if visual.attn_pool is not None:
        raise InheritError("visual.attn_pool (attentional pooling) is not supported by manual inheritance")
    return Tower("visual", "visual.", visual)


def text_tower(model: nn.Module) -> Tower:
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module):
        if not isinstance(text, TextTransformer):
            raise InheritError(
                f"text tower {type(text).__name__} is not supported (only open_clip's native TextTransformer)"
            )
        return Tower("text", "text.", text)
    if isinstance(getattr(model, "token_embedding", None), nn.Embedding) and hasattr(model, "transformer"):
        return Tower("text", "", model)  # open_clip.CLIP flattens its text tower into the model
    raise InheritError(f"text tower of {type(model).__name__} is not supported (no native open_clip text tower)")


def tower_blocks(tower: Tower) -> nn.ModuleList:
    blocks = getattr(getattr(tower.module, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise InheritError(f"{tower.kind}.transformer has no resblocks")
    return blocks


def _proj_out_dim(proj: nn.Module | torch.Tensor | None, width: int) -> int:
    if proj is None:
        return width
    if isinstance(proj, nn.Linear):
        return proj.out_features
    return proj.shape[1]


def tower_geometry(tower: Tower) -> TowerGeometry:
    blocks = tower_blocks(tower)
    attn = blocks[0].attn
    width = attn.num_heads * attn.head_dim
    common = dict(
        width=width,
        layers=len(blocks),
        heads=attn.num_heads,
        head_dim=attn.head_dim,
        mlp_width=blocks[0].mlp.c_fc.out_features,
    )
    m = tower.module
    if tower.kind == "visual":
        return TowerGeometry(
            **common,
            embed_dim=_proj_out_dim(m.proj, width),
            extent=m.positional_embedding.shape[0],
            patch_size=m.conv1.kernel_size[0],
        )
    return TowerGeometry(
        **common,
        embed_dim=_proj_out_dim(m.text_projection, width),
        extent=m.positional_embedding.shape[0],
        vocab_size=m.token_embedding.num_embeddings,
    )


# --------------------------------------------------------------------------------------------------------------
# Compatibility

_AT_MOST = ("width", "layers", "heads", "mlp_width", "embed_dim")


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise :class:`InheritError` (naming the field, e.g. ``text.layers``) unless ``student`` can inherit from
    ``teacher``; touches no weights."""
    for get in (_vision_tower, text_tower):
        t_tower, s_tower = get(teacher), get(student)
        kind = t_tower.kind
        t, s = tower_geometry(t_tower), tower_geometry(s_tower)
        if s.head_dim != t.head_dim:
            raise InheritError(f"{kind}.head_dim differs: student {s.head_dim}, teacher {t.head_dim}")
        for name in _AT_MOST:
            sv, tv = getattr(s, name), getattr(t, name)
            if sv > tv:
                raise InheritError(f"student {kind}.{name} {sv} > teacher {tv}")
        if kind == "visual":
            if s.patch_size != t.patch_size:
                raise InheritError(f"visual.patch_size differs: student {s.patch_size}, teacher {t.patch_size}")
            if s.extent != t.extent:
                raise InheritError(
                    f"visual.positional_embedding tokens differ: student {s.extent}, teacher {t.extent} "
                    "(resizing the position grid is out of scope)"
                )
            pos = s_tower.module.positional_embedding
            if not pos.requires_grad and s.width != t.width:
                raise InheritError(
                    "visual.positional_embedding is a fixed sin-cos table; cannot slice it to a new width"
                )
        else:
            if s.extent > t.extent:
                raise InheritError(f"student text.context_length {s.extent} > teacher {t.extent}")
            if s.vocab_size != t.vocab_size:
                raise InheritError(f"text.vocab_size differs: student {s.vocab_size}, teacher {t.vocab_size}")
            t_proj, s_proj = t_tower.module.text_projection, s_tower.module.text_projection
            if s_proj is not None and type(s_proj) is not type(t_proj):
                raise InheritError(
                    f"text.text_projection kinds differ: student {type(s_proj).__name__}, "
                    f"teacher {type(t_proj).__name__}"
                )
        if s.layers < 1:
            raise InheritError(f"student {kind}.layers must be >= 1")


# --------------------------------------------------------------------------------------------------------------
# Selections: which teacher index every student index takes


@dataclass(frozen=True)
class TowerSelection:
    """Teacher indices kept by one student tower, per dimension kind.

    The manual rule keeps leading indices; importance ranking and L0 fusing keep arbitrary ones. Index lists are
    kept in the order given (a student channel ``i`` is teacher channel ``width[i]``).
    """

    layers: list[int]  # teacher block of each student block
    width: list[int]  # residual-stream channels (shared by every block of the tower)
    heads: list[list[int]]  # per student block: teacher heads kept
    mlp: list[list[int]]  # per student block: teacher FFN channels kept
    embed: list[int]  # output (projection) channels; must be the same list for both towers


def manual_selection(t: TowerGeometry, s: TowerGeometry) -> TowerSelection:
    """TinyCLIP's rule as a selection: interval layers and the leading heads/channels."""
    layers = interval_layers(t.layers, s.layers)
    return TowerSelection(
        layers=layers,
        width=list(range(s.width)),
        heads=[list(range(s.heads)) for _ in layers],
        mlp=[list(range(s.mlp_width)) for _ in layers],
        embed=list(range(s.embed_dim)),
    )


# Axis kinds: None = leading slice to the student size (sizes that must match, e.g. patch, vocabulary, head dim);
# "head_ch" = the channels of the kept heads; "qkv" = those channels in each of the packed q, k, v.
Axes = tuple[str | None, ...]

BLOCK_AXES: dict[str, Axes] = {
    "attn.in_proj_weight": ("qkv", "width"),
    "attn.in_proj_bias": ("qkv",),
    "attn.out_proj.weight": ("width", "head_ch"),
    "attn.out_proj.bias": ("width",),
    "mlp.c_fc.weight": ("mlp", "width"),
    "mlp.c_fc.bias": ("mlp",),
    "mlp.c_proj.weight": ("width", "mlp"),
    "mlp.c_proj.bias": ("width",),
    **{f"{n}.{p}": ("width",) for n in ("ln_1", "ln_2", "ln_attn") for p in ("weight", "bias")},
    "ls_1.gamma": ("width",),
    "ls_2.gamma": ("width",),
    # CustomResidualAttentionBlock extras (NormFormer-style)
    **{f"attn.{n}.{p}": (None,) for n in ("ln_q", "ln_k") for p in ("weight", "bias")},  # head dim: equal
    "attn.logit_scale": ("heads", None, None),
    "attn.head_scale": ("heads", None, None),
    "attn.ln_inner.weight": ("head_ch",),
    "attn.ln_inner.bias": ("head_ch",),
    "mlp.ln.weight": ("mlp",),
    "mlp.ln.bias": ("mlp",),
}

VISUAL_AXES: dict[str, Axes] = {
    "conv1.weight": ("width", None, None, None),
    "class_embedding": ("width",),
    "positional_embedding": (None, "width"),
    **{f"{n}.{p}": ("width",) for n in ("ln_pre", "ln_post") for p in ("weight", "bias")},
    "proj": ("width", "embed"),
}

TEXT_AXES: dict[str, Axes] = {
    "token_embedding.weight": (None, "width"),
    "positional_embedding": (None, "width"),
    "cls_emb": ("width",),
    "ln_final.weight": ("width",),
    "ln_final.bias": ("width",),
    "text_projection": ("width", "embed"),
    "text_projection.weight": ("embed", "width"),
    "text_projection.bias": ("embed",),
}


def _head_channels(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def axis_index(
    axis: str | None, sel: TowerSelection, block: int | None, t_size: int, s_size: int, head_dim: int
) -> list[int]:
    """Teacher indices for one axis of one tensor."""
    if axis is None:
        return list(range(s_size))
    if axis in ("width", "embed"):
        return getattr(sel, axis)
    assert block is not None, axis  # per-block kinds only appear in block tensors
    heads, mlp = sel.heads[block], sel.mlp[block]
    if axis == "mlp":
        return mlp
    if axis == "heads":
        return heads
    channels = _head_channels(heads, head_dim)
    if axis == "head_ch":
        return channels
    width_t = t_size // 3  # "qkv": the same head channels in each of q, k, v
    return [part * width_t + c for part in range(3) for c in channels]


def _take(
    t: torch.Tensor, axes: Axes, shape: torch.Size, sel: TowerSelection, block: int | None, head_dim: int
) -> torch.Tensor:
    """``t`` indexed by the selection along every axis; must land exactly on the student ``shape``."""
    if t.dim() != len(shape) or len(axes) != t.dim():
        raise InheritError(f"cannot cut teacher shape {tuple(t.shape)} to student shape {tuple(shape)}")
    out = t
    for dim, axis in enumerate(axes):
        index = axis_index(axis, sel, block, t.shape[dim], shape[dim], head_dim)
        if len(index) != shape[dim] or (index and not 0 <= min(index) <= max(index) < t.shape[dim]):
            raise InheritError(
                f"cannot cut teacher shape {tuple(t.shape)} to student shape {tuple(shape)} "
                f"(axis {dim} '{axis or 'leading'}': {len(index)} indices)"
            )
        out = out.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=t.device))
    return out


def _scalar(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """logit_scale / logit_bias: one value, whatever the scalar/nonscalar layout."""
    if t.numel() != 1:
        raise InheritError(f"expected a one-element tensor, teacher has shape {tuple(t.shape)}")
    return t.reshape(shape)


BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class _Copy:
    student_name: str
    teacher_name: str
    axes: Axes | None  # None: a one-element scalar (logit scale / bias)
    sel: TowerSelection | None = None
    block: int | None = None
    head_dim: int = 0

    def value(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.axes is None or self.sel is None:
            return _scalar(t, shape)
        return _take(t, self.axes, shape, self.sel, self.block, self.head_dim)


def _plan_tower(
    t_tower: Tower, s_tower: Tower, s_names: list[str], sel: TowerSelection, head_dim: int
) -> tuple[list[_Copy], set[str]]:
    """Map the student tower's parameters to teacher parameters; returns (plan, claimed student names)."""
    rules = VISUAL_AXES if s_tower.kind == "visual" else TEXT_AXES
    plan: list[_Copy] = []
    claimed: set[str] = set()
    for name in s_names:
        if not name.startswith(s_tower.prefix):
            continue
        local = name[len(s_tower.prefix) :]
        block = BLOCK_RE.fullmatch(local)
        if block is not None:
            index, rest = int(block.group(1)), block.group(2)
            if rest not in BLOCK_AXES:
                continue  # no rule: reported as missed
            teacher_local = f"transformer.resblocks.{sel.layers[index]}.{rest}"
            plan.append(_Copy(name, t_tower.prefix + teacher_local, BLOCK_AXES[rest], sel, index, head_dim))
        elif local in rules:
            plan.append(_Copy(name, t_tower.prefix + local, rules[local], sel, None, head_dim))
        else:
            continue
        claimed.add(name)
    return plan, claimed


def tower_pairs(teacher: nn.Module, student: nn.Module) -> list[tuple[Tower, Tower]]:
    """(teacher tower, student tower) for the visual and the text tower, in that order."""
    return [(get(teacher), get(student)) for get in (_vision_tower, text_tower)]


def inherit_manual(teacher: nn.Module, student: nn.Module, *, copy_logit_scale: bool = True) -> dict:
    """Copy TinyCLIP-style sliced teacher weights into ``student`` in place; returns a report.

    The student keeps its own dtype and device. Every student parameter is written, or the call raises
    :class:`InheritError` before any weight is touched (parameters without a rule, e.g. from an unsupported block
    type, are named in the message); non-persistent buffers such as the causal ``attn_mask`` are the student's own.

    ``copy_logit_scale``: copy the teacher's ``logit_scale`` (default). **Deliberate difference from TinyCLIP**,
    whose manual inheritance leaves the student's initial ``logit_scale`` (and whose recipes then pin it with
    ``--logit-scale 50``); pass ``False`` to reproduce that. ``logit_bias`` is copied when both models have one;
    a student ``logit_bias`` without a teacher counterpart keeps its initial value (listed in ``kept_init``).

    Report keys: ``visual_layers`` / ``text_layers`` (teacher block of each student block), ``copied`` (number of
    tensors written), ``logit_scale_copied``, ``kept_init`` (student parameters intentionally left at their
    initial value), ``visual`` / ``text`` (``{"teacher": geometry, "student": geometry}``).
    """
    check_compatible(teacher, student)
    selections = {
        t.kind: manual_selection(tower_geometry(t), tower_geometry(s)) for t, s in tower_pairs(teacher, student)
    }
    return inherit_selected(teacher, student, selections, copy_logit_scale=copy_logit_scale)


def inherit_selected(
    teacher: nn.Module,
    student: nn.Module,
    selections: dict[str, TowerSelection],
    *,
    copy_logit_scale: bool = True,
) -> dict:
    """Copy the teacher indices named by ``selections`` (``{"visual": ..., "text": ...}``) into ``student``.

    The engine behind :func:`inherit_manual` (leading indices), importance-ranked inheritance, L0 fusing and block
    removal; same guarantees and report (see :func:`inherit_manual`). Shape mismatches raise :class:`InheritError`
    before anything is written. Does not run :func:`check_compatible` (callers that pick indices check it).
    """
    if selections["visual"].embed != selections["text"].embed:
        raise InheritError("visual and text towers must keep the same embedding channels (shared space)")
    t_params = plain_parameters(teacher)
    s_params = dict(student.named_parameters())
    s_names = list(s_params)

    plan, claimed, report = _plan_towers(teacher, student, s_names, selections)
    kept_init = _plan_scalars(plan, claimed, t_params, s_params, copy_logit_scale)

    # Every student parameter (state-dict entries that are not buffers) must have been planned or deliberately kept.
    buffers = {n for n, _ in student.named_buffers()}
    required = {k for k in student.state_dict() if k not in buffers}
    missed = sorted(required - claimed)
    if missed:
        raise InheritError(f"no inheritance rule for student parameters: {', '.join(missed)}")

    resolved = _resolve(plan, t_params, s_params)
    with torch.no_grad():
        for target, value in resolved:
            target.copy_(value.to(device=target.device, dtype=target.dtype))

    written = {c.student_name for c in plan} | set(kept_init)
    assert written >= required, sorted(required - written)  # guarded above; kept as a post-condition
    report["copied"] = len(resolved)
    report["logit_scale_copied"] = "logit_scale" in s_params and "logit_scale" not in kept_init
    report["kept_init"] = kept_init
    return report


_PARAMETRIZED = re.compile(r"(.*?)parametrizations\.([^.]+)\.original")


def plain_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``named_parameters`` with torch parametrizations read through their original (unparametrized) tensor.

    A model gated by L0 masks (``inherit/l0.py``) parametrizes ``attn.out_proj.weight``; fusing copies the raw
    weight and applies the mask itself.
    """
    out = {}
    for name, p in model.named_parameters():
        match = _PARAMETRIZED.fullmatch(name)
        out[match.group(1) + match.group(2) if match else name] = p
    return out


def _plan_towers(
    teacher: nn.Module, student: nn.Module, s_names: list[str], selections: dict[str, TowerSelection]
) -> tuple[list[_Copy], set[str], dict]:
    """Plan both towers' copies; returns (plan, claimed student names, report with layers and geometries)."""
    plan: list[_Copy] = []
    claimed: set[str] = set()
    report: dict = {}
    for t_tower, s_tower in tower_pairs(teacher, student):
        t_geo, s_geo = tower_geometry(t_tower), tower_geometry(s_tower)
        sel = selections[s_tower.kind]
        if len(sel.layers) != s_geo.layers:
            raise InheritError(f"{s_tower.kind}.layers: selection has {len(sel.layers)}, student {s_geo.layers}")
        report[f"{s_tower.kind}_layers"] = list(sel.layers)
        report[s_tower.kind] = {"teacher": asdict(t_geo), "student": asdict(s_geo)}
        tower_plan, tower_claimed = _plan_tower(t_tower, s_tower, s_names, sel, s_geo.head_dim)
        plan += tower_plan
        claimed |= tower_claimed
    return plan, claimed, report


def _plan_scalars(
    plan: list[_Copy], claimed: set[str], t_params: dict, s_params: dict, copy_logit_scale: bool
) -> list[str]:
    """Plan logit_scale / logit_bias copies; returns the names deliberately left at their initial value."""
    kept_init: list[str] = []
    for name in ("logit_scale", "logit_bias"):
        if name not in s_params:
            continue
        claimed.add(name)
        if (name == "logit_scale" and not copy_logit_scale) or name not in t_params:
            kept_init.append(name)
        else:
            plan.append(_Copy(name, name, None))
    return kept_init


def _resolve(plan: list[_Copy], t_params: dict, s_params: dict) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Every slice computed before anything is written, so a failure leaves the student untouched."""
    resolved: list[tuple[nn.Parameter, torch.Tensor]] = []
    for c in plan:
        if c.teacher_name not in t_params:
            raise InheritError(f"teacher has no parameter {c.teacher_name} for student {c.student_name}")
        target = s_params[c.student_name]
        try:
            value = c.value(t_params[c.teacher_name].detach(), target.shape)
        except InheritError as err:
            raise InheritError(f"{c.student_name} <- {c.teacher_name}: {err}") from None
        resolved.append((target, value))
    return resolved
