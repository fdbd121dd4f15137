"""Model presets: ``"PFT-B/2"``, ``"SiT-XL/2"``, tiny CPU presets -> constructor arguments.

One table holds the sizes; the family (PFT or SiT) decides per-patch time and the uncertainty
head; the patch size comes from the name. Input size, channels and classes are arguments.

Text-to-image presets (:class:`~.t2i.TextToImageTransformer`): ``"PFT-T2I-1.2B"`` / ``"SiT-T2I-1.2B"``
(the paper's size; 32 latent channels, text width 2048 by default) and tiny ones
``"PFT-T2I-{T,S,B}/{1,2,4,8}"`` (text width 384, MiniLM's, by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .t2i import TextToImageTransformer
from .transformer import PatchForcingTransformer

__all__ = [
    "SIZES",
    "FAMILIES",
    "PATCH_SIZES",
    "T2I_FAMILIES",
    "T2I_SIZES",
    "T2I_PAPER_SIZE",
    "T2I_PAPER_PARAMETERS",
    "list_models",
    "is_text_to_image",
    "t2i_data_defaults",
    "parse_model_name",
    "create_model",
    "count_parameters",
]

#: size letter -> (depth, hidden_size, num_heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "T": (6, 192, 3),  # tiny: CPU demos and tests
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

#: family -> (per_patch_time, predict_uncertainty)
FAMILIES: dict[str, tuple[bool, bool]] = {
    "PFT": (True, True),
    "SiT": (False, False),
}

PATCH_SIZES = (1, 2, 4, 8)

#: text-to-image family -> (per_patch_time, predict_uncertainty)
T2I_FAMILIES: dict[str, tuple[bool, bool]] = {
    "PFT-T2I": (True, True),
    "SiT-T2I": (False, False),
}

#: text-to-image size -> constructor arguments (the patch size comes from the name)
T2I_SIZES: dict[str, dict[str, Any]] = {
    "T": dict(
        depth=6, hidden_size=192, num_heads=3, mapping_width=64, refiner_width=192, refiner_heads=3, refiner_depth=1
    ),
    "S": dict(depth=12, hidden_size=384, num_heads=6, mapping_width=128, refiner_width=384, refiner_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12, mapping_width=256, refiner_width=768, refiner_heads=12),
}

#: the paper's text-to-image network (``docs/method.md`` section 7), always patch 2
T2I_PAPER_SIZE: dict[str, Any] = dict(
    depth=28,
    hidden_size=1536,
    num_heads=16,
    mapping_width=384,
    mapping_depth=2,
    refiner_width=1536,
    refiner_heads=12,
    refiner_depth=2,
    patch_size=2,
    rope_jitter=0.5,
)

#: defaults of the data-dependent arguments of the text-to-image presets: (in_channels, text_dim)
_T2I_DATA_DEFAULTS = {"1.2B": (32, 2048), "tiny": (4, 384)}

#: the authors' parameter count of their PFT-T2I-1.2B (``docs/method.md`` section 7)
T2I_PAPER_PARAMETERS = 1_239_969_008


def list_models() -> list[str]:
    """All preset names, e.g. ``["PFT-T/1", ..., "SiT-XL/8", "PFT-T2I-T/1", ..., "SiT-T2I-1.2B"]``."""
    names = [f"{fam}-{size}/{p}" for fam in FAMILIES for size in SIZES for p in PATCH_SIZES]
    for fam in T2I_FAMILIES:
        names += [f"{fam}-{size}/{p}" for size in T2I_SIZES for p in PATCH_SIZES] + [f"{fam}-1.2B"]
    return names


def is_text_to_image(name: str) -> bool:
    """Whether ``name`` is a text-to-image preset name (``"PFT-T2I-..."``, ``"SiT-T2I-..."``)."""
    return any(name.lower().startswith(fam.lower() + "-") for fam in T2I_FAMILIES)


def t2i_data_defaults(name: str) -> tuple[int, int]:
    """``(in_channels, text_dim)`` a text-to-image preset gets when they are not given."""
    return _T2I_DATA_DEFAULTS[_parse_t2i_name(name)[1]]


def _parse_t2i_name(name: str) -> tuple[dict[str, Any], str]:
    """``"PFT-T2I-S/2"`` -> (constructor arguments, ``"tiny"`` or ``"1.2B"``)."""
    fam = next(f for f in T2I_FAMILIES if name.lower().startswith(f.lower() + "-"))
    rest = name[len(fam) + 1 :]
    if rest.upper() == "1.2B":
        kwargs, kind = dict(T2I_PAPER_SIZE), "1.2B"
    else:
        try:
            size, patch = rest.split("/")
            kwargs, patch_size = dict(T2I_SIZES[size.upper()]), int(patch)
            if patch_size not in PATCH_SIZES:
                raise ValueError
        except (ValueError, KeyError):
            raise ValueError(
                f"unknown model {name!r}; text-to-image presets are {fam}-1.2B and {fam}-SIZE/PATCH with SIZE in "
                f"{list(T2I_SIZES)}, PATCH in {list(PATCH_SIZES)} (e.g. '{fam}-T/2')"
            ) from None
        kwargs["patch_size"], kind = patch_size, "tiny"
    kwargs["per_patch_time"], kwargs["predict_uncertainty"] = T2I_FAMILIES[fam]
    return kwargs, kind


def parse_model_name(name: str) -> dict[str, Any]:
    """``"PFT-B/2"`` -> the constructor arguments of that preset (without data-dependent ones).

    Text-to-image names (``"PFT-T2I-T/2"``, ``"SiT-T2I-1.2B"``) give the arguments of
    :class:`~.t2i.TextToImageTransformer` (they also hold ``depth``, ``hidden_size``, ``num_heads``
    and ``patch_size``).
    """
    if is_text_to_image(name):
        return _parse_t2i_name(name)[0]
    try:
        family, rest = name.split("-", 1)
        size, patch = rest.split("/")
        fam = next(f for f in FAMILIES if f.lower() == family.lower())
        depth, hidden, heads = SIZES[size.upper()]
        patch_size = int(patch)
        if patch_size not in PATCH_SIZES:
            raise ValueError
    except (ValueError, KeyError, StopIteration):
        raise ValueError(
            f"unknown model {name!r}; expected FAMILY-SIZE/PATCH with FAMILY in {list(FAMILIES)}, "
            f"SIZE in {list(SIZES)}, PATCH in {list(PATCH_SIZES)} (e.g. 'PFT-B/2', 'SiT-XL/2')"
        ) from None
    per_patch_time, predict_uncertainty = FAMILIES[fam]
    return dict(
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        patch_size=patch_size,
        per_patch_time=per_patch_time,
        predict_uncertainty=predict_uncertainty,
    )


def create_model(
    name: str,
    input_size: int | tuple[int, int] = 32,
    in_channels: int | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> PatchForcingTransformer | TextToImageTransformer:
    """Build a preset, e.g. ``create_model("PFT-B/2", input_size=32, in_channels=4, num_classes=1000)``
    or ``create_model("PFT-T2I-1.2B", in_channels=32, text_dim=2048)``.

    ``in_channels`` defaults to 4 (32 for the ``*-T2I-1.2B`` presets), ``num_classes`` to 1000
    (class presets only: text-to-image presets take ``text_dim=``, default 2048 for 1.2B and 384
    for the tiny ones). ``overrides`` replace preset arguments (``depth=``, ``mlp_ratio=``,
    ``predict_uncertainty=``, ``rope_jitter=`` ...).
    """
    if is_text_to_image(name):
        if num_classes is not None:
            raise ValueError(f"{name} is a text-conditioned model: num_classes does not apply (give text_dim=)")
        kwargs, kind = _parse_t2i_name(name)
        channels, text_dim = _T2I_DATA_DEFAULTS[kind]
        kwargs.update(input_size=input_size, in_channels=channels if in_channels is None else in_channels)
        kwargs["text_dim"] = text_dim
        kwargs.update(overrides)
        return TextToImageTransformer(**kwargs)
    kwargs = parse_model_name(name)
    kwargs.update(
        input_size=input_size,
        in_channels=4 if in_channels is None else in_channels,
        num_classes=1000 if num_classes is None else num_classes,
    )
    kwargs.update(overrides)
    return PatchForcingTransformer(**kwargs)


def count_parameters(name: str, **kwargs: Any) -> int:
    """Parameters of preset ``name`` (``create_model`` arguments in ``kwargs``), counted on the meta
    device: nothing is allocated, so the 1.2B presets count instantly."""
    with torch.device("meta"):
        model: nn.Module = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())
