"""Typed experiment configuration for ``patchforcing train CONFIG.yaml [dotted.key=value ...]``.

Built on OmegaConf structured configs: the section dataclasses below are the schema (every field,
its type and its default), and OmegaConf parses the YAML, merges files and overrides into the
schema and checks keys and types. A config is a YAML mapping with an optional top-level ``name``,
an optional ``base`` and the sections, each a mapping of fields::

    base: demo                 # optional: start from this preset (or file), then apply this file
    name: pft-b2-imagenet256
    model:     {name: PFT-B/2, input_size: 32, in_channels: 4, num_classes: 1000}
    data:      {kind: latents, path: data/imagenet256-latents, resolution: 256}
    autoencoder: {kind: kl, source: stabilityai/sd-vae-ft-ema}
    objective: {timestep_sampler: ltg, timestep_options: {loc: 0.7, scale: 1.0, std: 0.6}}
    optim:     {lr: 1.0e-4, batch_size: 256}
    ema:       {decay: 0.9999}
    sample:    {sampler: euler_pf, steps: 50}
    train:     {max_steps: 400000, precision: auto}
    repa:      {enabled: false}   # REPA alignment (docs/repa.md)

Any key may be left out (the parent's value, else the default, fills in); a section may be left
out or empty; an empty file is refused. An unknown key, at any depth, is an error naming the dotted
key and the closest match - except inside the two free-form mappings ``objective.timestep_options``
(keyword arguments of :func:`patchforcing.flow.timesteps.make_timestep_sampler`) and
``sample.options`` (keyword arguments of the sampler), which are each ONE value: a file or
override that gives the mapping replaces it (``sample.options={}`` clears it), while
``sample.options.KEY=value`` sets one key.

``base`` (inheritance): a bare name (no ``/``, no ``.yaml``) is a file in the presets directory
(a preset, or a partial such as ``_imagenet256`` that is not a runnable preset); anything else is a
path relative to the file that names it. The parent is resolved first (it may have a ``base`` of
its own; a cycle is an error), then the child's keys are merged over it. :func:`save_config` writes
the fully resolved config (no ``base``), so a run directory is self-contained.

Overrides on the command line are ``dotted.key=value`` strings, applied in order after the file
(the last one wins)::

    patchforcing train demo optim.lr=3e-4 train.compile=true optim.betas=[0.9,0.95] \\
        model.num_classes=null objective.timestep_options.loc=0.5

The value is parsed by OmegaConf as YAML (``3e-4`` is a float, as in YAML 1.2), so numbers,
``true``/``false``, ``null`` and flow lists/mappings work; a value for a text field that YAML reads
as a number or boolean (``name=2024``) is kept as the text. A section may be set as a whole with a
mapping (``optim={lr: 1e-3, warmup_steps: 10}``), which updates the given keys only.

Types follow OmegaConf's conversions: an ``int`` (or numeric text) is accepted for a ``float``
field and stored as a float, a ``float`` or ``bool`` is refused for an ``int`` field, ``null`` only
where the field allows ``None``, and list elements are checked. Then semantic checks run (valid
choices, finite and positive numbers, divisibility, the model name, a plain run name, ...); every
problem is reported as :class:`ConfigError` (a ``ValueError``) with a one-line message naming the
dotted key.

``CONFIG`` is a path to a YAML file or the name of a preset in the repository's ``configs/``
directory (a bare name without ``/`` and without ``.yaml``, e.g. ``demo``): see
:func:`list_presets` and :func:`preset_path`.
"""

from .loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    list_presets,
    load_config,
    preset_path,
    save_config,
)
from .schema import (
    AUTOENCODER_CONFIG_KINDS,
    DATA_KINDS,
    PRECISIONS,
    REPA_SOURCES,
    RESUME_SAFE_KEYS,
    SAMPLE_SAMPLERS,
    TRAIN_STRATEGIES,
    AutoencoderSection,
    ConfigError,
    DataSection,
    EmaSection,
    ExperimentConfig,
    ModelSection,
    ObjectiveSection,
    OptimSection,
    RepaSection,
    SampleSection,
    TrainSection,
)

__all__ = [
    "ConfigError",
    "ModelSection",
    "DataSection",
    "AutoencoderSection",
    "ObjectiveSection",
    "OptimSection",
    "EmaSection",
    "SampleSection",
    "RepaSection",
    "TrainSection",
    "ExperimentConfig",
    "DATA_KINDS",
    "AUTOENCODER_CONFIG_KINDS",
    "PRECISIONS",
    "REPA_SOURCES",
    "SAMPLE_SAMPLERS",
    "TRAIN_STRATEGIES",
    "RESUME_SAFE_KEYS",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "diff_configs",
    "preset_path",
    "list_presets",
]
