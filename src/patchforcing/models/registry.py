"""Model presets: ``"PFT-B/2"``, ``"SiT-XL/2"``, tiny CPU presets -> constructor arguments.

One table holds the sizes; the family (PFT or SiT) decides per-patch time and the uncertainty
head; the patch size comes from the name. Input size, channels and classes are arguments.
"""

from __future__ import annotations

from typing import Any

from .transformer import PatchForcingTransformer

__all__ = ["SIZES", "FAMILIES", "PATCH_SIZES", "list_models", "parse_model_name", "create_model"]

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


def list_models() -> list[str]:
    """All preset names, e.g. ``["PFT-T/1", ..., "SiT-XL/8"]``."""
    return [f"{fam}-{size}/{p}" for fam in FAMILIES for size in SIZES for p in PATCH_SIZES]


def parse_model_name(name: str) -> dict[str, Any]:
    """``"PFT-B/2"`` -> the constructor arguments of that preset (without data-dependent ones)."""
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
    in_channels: int = 4,
    num_classes: int = 1000,
    **overrides: Any,
) -> PatchForcingTransformer:
    """Build a preset, e.g. ``create_model("PFT-B/2", input_size=32, in_channels=4, num_classes=1000)``.

    ``overrides`` replace preset arguments (``depth=``, ``mlp_ratio=``, ``predict_uncertainty=`` ...).
    """
    kwargs = parse_model_name(name)
    kwargs.update(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    kwargs.update(overrides)
    return PatchForcingTransformer(**kwargs)
